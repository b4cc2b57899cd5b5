// One parse drawn on a canvas: the photo, the part colours over it (opacity) or alone, the
// part and person under the pointer, and the legend and people lists. Everything is drawn
// from labels.png (pixel value = class id) and the model's labels, so the page needs one
// download for every view.

const DEFAULT_OPACITY = 0.55;  // the template's slider starts here
const BLACK = [0, 0, 0];  // a class the labels do not list

export class ResultViewer {
  // root: the card's `.result` element; classes: /v1/labels ({id, name, color}, by id)
  static async open(root, { id, name, file, labelsPng, result, classes }) {
    const { width, height } = result.image;
    const [photo, classMap] = await Promise.all([
      loadPhoto(file, width, height),
      decodeClassMap(labelsPng, width, height),
    ]);
    return new ResultViewer(root, { id, name, photo, classMap, result, classes });
  }

  constructor(root, { id, name, photo, classMap, result, classes }) {
    this.root = root;
    this.result = result;
    this.classes = classes;
    this.palette = classes.map((c) => c.color);
    this.width = result.image.width;
    this.height = result.image.height;
    this.photo = photo;
    this.classMap = classMap;
    this.layers = buildLayers(classMap, this.width, this.height, this.palette);
    this.mode = "overlay";
    this.opacity = DEFAULT_OPACITY;
    this.canvas = root.querySelector(".view");
    this.canvas.width = this.width;
    this.canvas.height = this.height;
    this.render();
    this.fillLegend(name);
    this.fillPersons();
    this.bindControls(id);
    this.bindPointer();
  }

  className(cls) {
    return this.classes[cls]?.name || `class ${cls}`;
  }

  render() {
    const ctx = this.canvas.getContext("2d");
    ctx.globalAlpha = 1;
    if (this.mode === "mask") {
      ctx.putImageData(this.layers.mask, 0, 0);
      return;
    }
    ctx.drawImage(this.photo, 0, 0, this.width, this.height);
    if (this.mode === "overlay") {
      ctx.globalAlpha = this.opacity;
      ctx.drawImage(this.layers.overlay, 0, 0);
      ctx.globalAlpha = 1;
    }
  }

  // id: makes the radio group's name unique on a page of several cards
  bindControls(id) {
    for (const radio of this.root.querySelectorAll(".modes input")) {
      radio.name = `mode-${id}`;
      radio.addEventListener("change", () => {
        this.mode = radio.value;
        this.render();
      });
    }
    const slider = this.root.querySelector(".opacity");
    slider.addEventListener("input", () => {
      this.opacity = slider.value / 100;
      this.root.querySelector(".opacity-value").textContent = `${slider.value}%`;
      // the opacity only shows over the photo: switch to that view
      if (this.mode !== "overlay") {
        this.mode = "overlay";
        this.root.querySelector('.modes input[value="overlay"]').checked = true;
      }
      this.render();
    });
  }

  bindPointer() {
    const canvas = this.canvas;
    const tip = this.root.querySelector(".tip");
    const show = (event) => {
      const rect = canvas.getBoundingClientRect();
      const x = Math.floor((event.clientX - rect.left) * this.width / rect.width);
      const y = Math.floor((event.clientY - rect.top) * this.height / rect.height);
      if (x < 0 || y < 0 || x >= this.width || y >= this.height) {
        tip.hidden = true;
        return;
      }
      tip.textContent = this.describe(x, y);
      tip.hidden = false;
      // keep the whole tip over the picture, also at its edges
      const half = tip.offsetWidth / 2;
      const left = Math.min(Math.max(event.clientX - rect.left, half), canvas.clientWidth - half);
      tip.style.left = `${left}px`;
      tip.style.top = `${event.clientY - rect.top}px`;
    };
    canvas.addEventListener("pointermove", show);
    canvas.addEventListener("pointerdown", show);  // touch: a tap names the part
    canvas.addEventListener("pointerleave", () => { tip.hidden = true; });
  }

  describe(x, y) {
    const cls = this.classMap[y * this.width + x];
    if (!cls) return "Background";
    const label = this.className(cls);
    // the person: one whose part of this class covers the point (best score first)
    const part = this.result.parts
      .filter((p) => p.label_id === cls && p.person_id !== null &&
        x >= p.bbox[0] && y >= p.bbox[1] && x < p.bbox[0] + p.bbox[2] && y < p.bbox[1] + p.bbox[3])
      .sort((a, b) => b.score - a.score)[0];
    return part ? `${label} · person ${part.person_id + 1}` : label;
  }

  // name: the photo's, for the canvas's text alternative
  fillLegend(name) {
    const counts = new Map();
    for (const v of this.classMap) if (v) counts.set(v, (counts.get(v) || 0) + 1);
    const total = this.classMap.length;
    const list = this.root.querySelector(".legend ul");
    list.replaceChildren();
    const entries = [...counts.entries()].sort((a, b) => b[1] - a[1]);
    for (const [cls, n] of entries) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${(this.palette[cls] || BLACK).join(",")})`;
      const label = document.createElement("span");
      label.textContent = this.className(cls);
      const share = document.createElement("span");
      share.className = "share";
      const pct = 100 * n / total;
      share.textContent = pct < 0.1 ? "<0.1%" : `${pct.toFixed(1)}%`;
      li.append(swatch, label, share);
      list.append(li);
    }
    if (!entries.length) list.innerHTML = "<li>No person found.</li>";
    const summary = entries.slice(0, 6).map(([c, n]) =>
      `${this.className(c)} ${(100 * n / total).toFixed(0)}%`).join(", ");
    this.canvas.setAttribute("aria-label", `Parsed ${name}: ${summary || "no person found"}`);
  }

  fillPersons() {
    const section = this.root.querySelector(".persons");
    const persons = this.result.persons;
    section.hidden = !persons.length;
    const list = section.querySelector("ul");
    list.replaceChildren();
    for (const person of persons) {
      const li = document.createElement("li");
      const parts = [...new Set(person.parts)].join(", ") || "no parts";
      li.textContent = `Person ${person.person_id + 1} (${Math.round(person.score * 100)}%): ${parts}`;
      list.append(li);
    }
  }
}

async function loadPhoto(file, width, height) {
  // the browser applies EXIF orientation, as the service did
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null);
  if (bitmap) return bitmap;
  // a photo this browser cannot decode: black, under the parts
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").fillRect(0, 0, width, height);
  return canvas;
}

async function decodeClassMap(png, width, height) {
  // the raw grey values are the class ids: no colour management, no premultiplying
  const bitmap = await createImageBitmap(png, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const ids = new Uint8Array(width * height);
  for (let i = 0; i < ids.length; i++) ids[i] = rgba[4 * i];
  return ids;
}

function buildLayers(classMap, width, height, palette) {
  // overlay: part colours, transparent background; mask: part colours on black
  const overlay = new ImageData(width, height);
  const mask = new ImageData(width, height);
  for (let i = 0; i < classMap.length; i++) {
    const cls = classMap[i];
    const colour = palette[cls] || BLACK;
    const o = 4 * i;
    mask.data[o] = colour[0]; mask.data[o + 1] = colour[1]; mask.data[o + 2] = colour[2]; mask.data[o + 3] = 255;
    if (cls) {
      overlay.data[o] = colour[0]; overlay.data[o + 1] = colour[1]; overlay.data[o + 2] = colour[2];
      overlay.data[o + 3] = 255;
    }
  }
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").putImageData(overlay, 0, 0);
  return { overlay: canvas, mask };
}
