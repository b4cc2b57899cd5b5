// The page's entry: waits for the service and describes its models (offering the choice
// when there are several), takes photos (drop, paste, file picker, keyboard) and gives
// each its TaskCard, asks for an API key on a 401.

import { TaskCard } from "./task-card.js";
import { Client, errorOf, sleep } from "./transport.js";

const READY_POLL_MS = 2000;

// What the cards need of the service: its runtime (/v1/model: upload limit, outputs), its
// models (/v1/models) with each one's labels, and the model chosen on the page. A card
// reads `model` and `chosen` as it uploads (null until known: the service then judges
// the size itself and runs its default model) and waits for `described` before drawing a
// result, which a photo sent while the page was loading can reach first.
class ServiceDescription {
  model = null;
  models = [];
  chosen = null;
  #labels = new Map();  // model id -> its labels
  #resolve;
  described = new Promise((resolve) => { this.#resolve = resolve; });

  set(model, { default: chosen, models }, labels) {
    this.model = model;
    this.models = models;
    this.chosen = chosen;
    models.forEach((m, i) => this.#labels.set(m.id, labels[i]));
    this.#resolve();
  }

  // the classes of the model that ran a task ({id, name, color}, by id)
  labelsOf(modelId) {
    return this.#labels.get(modelId) || [];
  }
}

const $ = (selector) => document.querySelector(selector);
const client = new Client({ onUnauthorized: () => { $("#key-box").hidden = false; } });
const service = new ServiceDescription();

async function loadService() {
  const banner = $("#banner");
  for (;;) {
    const ready = await client.request("/readyz").catch(() => null);
    if (ready && ready.ok) {
      const [model, models] = await Promise.all([client.request("/v1/model"), client.request("/v1/models")]);
      if (model.ok && models.ok) {
        const listed = await models.json();
        const labels = await Promise.all(listed.models.map((m) => client.request(m.labels)));
        if (labels.every((r) => r.ok)) {
          service.set(await model.json(), listed, await Promise.all(labels.map((r) => r.json())));
          break;
        }
        if (labels.some((r) => r.status === 401)) return;
      }
      // a 401 has shown the key box, and saving a key comes back here
      if (model.status === 401 || models.status === 401) return;
    } else {
      const error = ready ? await errorOf(ready) : { message: "The service cannot be reached." };
      banner.hidden = false;
      banner.textContent = `Not ready: ${error.message}`;
    }
    await sleep(READY_POLL_MS);
  }
  offerModels();
  describeModel();
}

// the choice, only when there is one: a new photo runs on the model chosen when it is added
function offerModels() {
  const select = $("#model-select");
  select.replaceChildren(...service.models.map((m) => new Option(
    `${m.id} (${m.single_human ? "one person" : "several people"})`, m.id, false, m.id === service.chosen)));
  $("#model-choice").hidden = service.models.length < 2;
  select.onchange = () => {
    service.chosen = select.value;
    describeModel();
  };
}

function describeModel() {
  const banner = $("#banner");
  const m = service.models.find((each) => each.id === service.chosen);
  $("#model-info").textContent =
    `Model ${m.id} · ${m.single_human ? "one person" : "several people"} · ${m.backend} · ${m.threads} threads`;
  if (m.pretrained === false) {
    banner.hidden = false;
    banner.textContent = "Demo mode: this service runs a stand-in model with random weights " +
      "(pretrained: false). The masks below are not real parses.";
  } else {
    banner.hidden = true;
  }
}

function addFiles(files) {
  for (const file of files) {
    if (!file) continue;  // anything else goes to the service, which says what is wrong
    const card = new TaskCard(file, { client, service });
    $("#tasks").prepend(card.el);
    card.submit();
  }
}

function setUpInputs() {
  const drop = $("#drop");
  const input = $("#file-input");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    // the drop zone is a button to keyboard and screen-reader users
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";  // choosing the same file again is a new upload
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.items || [])]
      .filter((item) => item.kind === "file").map((item) => item.getAsFile());
    if (files.length) addFiles(files);
  });
  $("#api-key-save").addEventListener("click", () => {
    client.useKey($("#api-key").value.trim());
    $("#key-box").hidden = true;
    loadService();
  });
}

setUpInputs();
loadService();
