"""A peft model made private with ``make_private`` trains with ``transformers.Trainer``."""

import math

import torch

from hetune.models.loading import load_model
from hetune.protocols.hybrid_lora.owner.client import make_private
from hetune.protocols.hybrid_lora.owner.layer import OutsourcedLinear


def test_trainer_trains_lora_on_the_quantized_backend(tmp_path, micro_bundle):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    base = load_model("micro-llama", seed=0)
    model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm = make_private(model, "quantized", bundle=micro_bundle)
    float_linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]
    assert [n.rsplit(".", 1)[-1] for n in float_linears] == ["lm_head"]  # every frozen block linear is outsourced
    assert sum(isinstance(m, OutsourcedLinear) for m in model.modules()) == 7 * 2

    ids = base.tokenizer("def add(a, b):\n    return a + b\n" * 4, return_tensors="pt")["input_ids"][0]
    blocks = ids[: 4 * 16].reshape(4, 16)  # (4 blocks, 16 tokens)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()

    assert math.isfinite(result.training_loss)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert pm.backend.stats.round_trips > 0  # the frozen products ran on the backend
    pm.close()
