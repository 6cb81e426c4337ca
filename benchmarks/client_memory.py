"""Peak memory of the data owner's process versus loading the whole model.

Question: the client never loads the outsourced base weights; how much memory does that
save on a Llama-3.2-1B-shaped checkpoint?

Saves ``llama-3.2-1b-shape`` (real config, random weights) with ``save_pretrained``,
then, each in a fresh process, measures peak RSS of (a) ``from_pretrained`` of the whole
model and (b) hetune's client load (``load_client_model``: embeddings, norms, lm_head,
outsourced linears as placeholders) plus LoRA r=8 on all linears. Both then read every
parameter once, as a forward pass would (safetensors maps files lazily, so RSS right
after loading undercounts).

    .venv/bin/python benchmarks/client_memory.py      # about 4 minutes, 5 GB of temp disk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import environment, write_json

FULL = """
import resource, json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)
touched = sum(float(p.detach().sum()) for p in m.parameters())  # read every page (safetensors maps lazily)
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "param_bytes_held": sum(p.untyped_storage().nbytes() for p in m.parameters())}))
"""

CLIENT = """
import resource, json
from hetune.models.client_weights import load_client_model
from hetune.models.layers import op_groups
from hetune.models.loading import load_config
from hetune.protocols.hybrid_lora.owner.client import LoraSettings, wrap_lora
members = [m for g in op_groups(load_config(DIR)) for m in g.members]
loaded = load_client_model(DIR, members)
model = wrap_lora(loaded.model, LoraSettings(), seed=0)
touched = sum(float(p.detach().sum()) for p in model.parameters())  # read every page, as a forward pass would
held = sum(p.untyped_storage().nbytes() for p in model.parameters())
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "param_bytes_held": held}))
"""


def run(code: str, directory: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code.replace("DIR", repr(directory))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "client_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", (
            "import torch; from hetune.models.loading import load_model;"
            f"m = load_model('llama-3.2-1b-shape'); m.model.save_pretrained({tmp!r}); m.tokenizer.save_pretrained({tmp!r})")],
            check=True, capture_output=True)
        full, client = run(FULL, tmp), run(CLIENT, tmp)
    result = {"benchmark": "client_memory", "model": "llama-3.2-1b-shape", "environment": environment(),
              "full_model": full, "client": client, "ratio_client_over_full": client["peak_rss_bytes"] / full["peak_rss_bytes"]}
    write_json(args.out, result)
    print(f"full model peak RSS {full['peak_rss_bytes'] / 2**30:.2f} GiB, client {client['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"({result['ratio_client_over_full']:.0%}); wrote {args.out}")


if __name__ == "__main__":
    main()
