"""scripts/train_stand_in.py runs end to end (a few steps: the real training takes 25
minutes) and writes a stand-in the engine loads and marks as not pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from m2fp_api import HumanParser
from m2fp_api.engine.checkpoint import CONFIG_FILE, STAND_IN_KEY

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_stand_in.py"


def test_training_script_writes_a_loadable_marked_stand_in(tmp_path):
    out = tmp_path / "stand-in"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--steps", "2", "--batch", "1",
                           "--crop", "64", "--eval", "1", "--freeze-bn"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out pixel accuracy over 1 scenes" in proc.stdout
    marker = json.loads((out / CONFIG_FILE).read_text())[STAND_IN_KEY]
    assert marker["stand_in"] is True and marker["steps"] == 2
    assert (marker["config"], marker["crop"], marker["freeze_bn"]) == ("tiny-multiple.json", 64, True)
    parser = HumanParser.from_pretrained(str(out), allow_download=False)
    assert parser.info.pretrained is False
