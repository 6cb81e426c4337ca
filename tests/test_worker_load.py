"""Eight data owners train at once against one worker: no errors, each owner's run equals its solo run, memory bounded.

Batched RLWE is exact, so an owner's losses and adapter after its steps on the shared
worker equal, bit for bit, the same steps alone on the ``quantized`` backend. Memory:
the first step of eight owners grows this process (worker and owners) by about 0.5 GiB of
working set and allocator arenas on 2 cores; later steps must not add to it.
"""

from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from hetune.compile.bundle import load_bundle
from hetune.serving.admission import add_owner
from hetune.protocols.hybrid_lora.owner.client import build_private_model
from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess
from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker, ServeConfig

OWNERS, STEPS, TOKENS = 8, 3, 8


def batches(owner: int) -> torch.Tensor:
    return torch.randint(0, 256, (STEPS, 1, TOKENS), generator=torch.Generator().manual_seed(100 + owner))  # (steps, B, T)


class Owner:
    """One data owner's model and AdamW, stepped one batch at a time."""

    def __init__(self, pm):
        self.pm, self.losses = pm, []
        self.params = {n: p for n, p in pm.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=1e-2)

    def step(self, ids: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = self.pm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}


def run_steps(pm, data: torch.Tensor) -> Owner:
    owner = Owner(pm)
    for ids in data:
        owner.step(ids)
    return owner


def test_eight_owners_at_once_equal_their_solo_runs(micro_bundle, tmp_path, record_property):
    keys_file = tmp_path / "keys.txt"
    api_keys = [add_owner(keys_file, f"owner{i}") for i in range(OWNERS)]
    solo = [run_steps(build_private_model("micro-llama", "quantized", bundle=micro_bundle), batches(i)) for i in range(OWNERS)]

    process = psutil.Process()
    with LoopbackWorker(load_bundle(micro_bundle), ServeConfig(max_sessions=OWNERS, api_keys=keys_file)) as worker:
        # built one after another (LoRA init seeds torch's global RNG); each opens its own session with its own keys
        owners = [Owner(build_private_model("micro-llama", "remote", workers=(worker.url,), access=WorkerAccess(api_key=key)))
                  for key in api_keys]
        rss = [process.memory_info().rss / 2**20]  # MiB: before, then after each step of all owners
        with ThreadPoolExecutor(OWNERS) as pool:
            for step in range(STEPS):
                list(pool.map(Owner.step, owners, [batches(i)[step] for i in range(OWNERS)]))  # list(): raise any error
                rss.append(process.memory_info().rss / 2**20)
        for owner in owners:
            owner.pm.close()

    for i, (owner, alone) in enumerate(zip(owners, solo)):
        assert all(torch.equal(a, b) for a, b in zip(owner.losses, alone.losses)), f"owner {i} losses"
        mine, theirs = owner.weights(), alone.weights()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), f"owner {i} adapter"
    assert len({float(owner.losses[0]) for owner in owners}) == OWNERS  # each trained on its own data
    record_property("rss_mib", rss)
    print(f"RSS (MiB) before and after each step of {OWNERS} owners: {', '.join(f'{r:.0f}' for r in rss)}")
    # each step moves ~120 MB of requests and results: had they piled up, steps 2 and 3 would add that much each
    assert rss[-1] - rss[1] < 128


@pytest.mark.slow
def test_owner_over_its_rate_waits_and_finishes(micro_bundle, tmp_path):
    """A client past its requests-per-minute gets 429 + Retry-After and waits as told, then succeeds."""
    from hetune.serving.admission import OwnerLimits

    keys_file = tmp_path / "keys.txt"
    key = add_owner(keys_file, "clinic")
    cfg = ServeConfig(api_keys=keys_file, owner_limits=OwnerLimits(requests_per_minute=12))
    with LoopbackWorker(load_bundle(micro_bundle), cfg) as worker:
        pm = build_private_model("micro-llama", "remote", workers=(worker.url,), access=WorkerAccess(api_key=key))
        together = run_steps(pm, batches(0)[:1])  # 1 + 15 requests > a 12-request burst: the last 4 wait 5 s each
        pm.close()
    solo = run_steps(build_private_model("micro-llama", "quantized", bundle=micro_bundle), batches(0)[:1])
    assert all(torch.equal(a, b) for a, b in zip(together.losses, solo.losses))
