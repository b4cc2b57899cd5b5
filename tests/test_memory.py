"""Post-processing memory is bounded by its chunk budget, not by queries x pixels.

ModelScope upsamples all 100 query masks to full resolution at once (100 x 12 MP x 4 B
= 4.8 GB for a 4000x3000 photo). Measured in a fresh process with ru_maxrss.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, torch
from m2fp_api.engine.postprocess import parse_multiple
from m2fp_api.engine.preprocess import NetworkInput
from m2fp_api.engine.stand_in import bundled_configuration
from m2fp_api.model import M2FPConfig, NetworkOutput

cfg = M2FPConfig.from_model_section(bundled_configuration("r101-multiple.json")["model"])
g = torch.Generator().manual_seed(0)
# 100 queries, all confident (the worst case): every one is upsampled and pasted
logits = torch.randn(1, 100, 22, generator=g) * 0.1
logits[0, torch.arange(100), torch.arange(100) % 21] = 9.0
yy, xx = torch.meshgrid(torch.linspace(-1, 1, 240), torch.linspace(-1, 1, 320), indexing="ij")
centres = torch.rand(100, 2, generator=g) * 1.6 - 0.8
masks = 6 - 12 * ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
out = NetworkOutput(pred_logits=logits, pred_masks=masks[None], padded_size=(960, 1280))
inp = NetworkInput(tensor=torch.zeros(3, 960, 1280), output_size=(3000, 4000), crop_box=None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    result = parse_multiple(out, inp, cfg, chunk_bytes=64 * 2**20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(result.parts) + len(result.persons), (after - before) * 1024)
"""


def test_postprocessing_12mp_with_100_confident_queries_stays_bounded():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    found, growth = (int(v) for v in proc.stdout.split())
    assert found >= 90  # the work really happened
    # chunk budget (64 MB) x a few temporaries, plus the 12 MP maps (uint8 + float32)
    assert growth < 600 * 2**20, growth / 2**20
