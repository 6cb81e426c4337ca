"""`hetune federate privtuner`: the plan's owners train at once through one worker, each at its planned resources.

Four owners, each with its own documents, keys and parameter set, train through one
loopback worker at the same time; rlwe is exact, so each adapter equals the owner's solo
``quantized`` run bit for bit. The plan is applied: each owner's uplink carries exactly
the ciphertexts of its own parameter set (the worker accepts a request only at its
session's set and size), no faster than the planned rate, and every emulated phase is
waited out. Bad plan files are refused before anything is loaded or written.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hetune.crypto.registry import get_scheme
from hetune.errors import ConfigError
from hetune.protocols.privtuner.costs import workload_products
from hetune.protocols.privtuner.federate import FederateConfig, load_plan, run_federate
from hetune.protocols.privtuner.run import PlanConfig, run_plan

OWNERS = """
[[owner]]
samples = {samples}
distance_m = 60.0
max_power_w = 0.5
max_cpu_ghz = 1.0

[[owner]]
samples = {samples}
distance_m = 120.0
max_power_w = 0.8
max_cpu_ghz = 0.8

[[owner]]
samples = {samples}
distance_m = 200.0
max_power_w = 1.0
max_cpu_ghz = 1.2

[[owner]]
samples = {samples}
distance_m = 90.0
max_power_w = 0.3
max_cpu_ghz = 0.6
"""


def cell_text(model: str, layers: int, deadline: float, samples: int = 1, owners: int = 4) -> str:
    return f"""[cell]
bandwidth_mhz = 20.0
noise_dbm_per_hz = -174.0
deadline_s = {deadline}
server_ghz = 2.3
downlink_mbps = 1000.0

[workload]
model = "{model}"
layers = {layers}
seq_len = 16
batch = 1
""" + "[[owner]]".join(OWNERS.format(samples=samples).split("[[owner]]")[: owners + 1])


def make_plan(root: Path, cell: str, omega: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cell.toml").write_text(cell)
    run_plan(PlanConfig(cell=root / "cell.toml", omega=omega, out=root / "plan", sweep=False))
    return root / "plan" / "privtuner.json"


@pytest.fixture(scope="module")
def micro_plan(tmp_path_factory):
    """micro-llama, 5 s deadline: at omega 0.003 the planner gives three owners p256 and one p128."""
    return make_plan(tmp_path_factory.mktemp("micro"), cell_text("micro-llama", 0, 5.0), 0.003)


def check_run(report: dict, plan_path: Path, allocation: str = "plan") -> None:
    lp = load_plan(plan_path, allocation)
    cell, scheme = lp.cell, get_scheme(lp.costs.scheme)
    products = workload_products(cell.model, cell.layers)
    assert report["all_equal_to_solo"] is True
    adapters = []
    for row, planned in zip(report["owners"], lp.owners):
        m = row["measured"]
        assert row["equal_to_solo"] is True and row["param_set"] == planned.param_set
        assert row["steps"] == cell.owners[row["owner"] - 1].samples // cell.batch
        assert m["round_trips"] == row["steps"] * len(products)
        # exactly this set's ciphertexts went up: the worker took each request at the session's set and size
        params = scheme.params(planned.param_set)
        bits = 8 * row["steps"] * sum(scheme.request_bytes(params, cell.batch * cell.seq_len, p.k) for p in products)
        assert m["uplink_bits"] == bits
        assert m["uplink_bits"] / 1e6 / m["uplink_s"] <= row["uplink_mbps"]  # the planned rate is a cap that held
        assert m["server_s"] >= m["server_busy_s"] * lp.costs.cpu_ghz / planned.server_ghz * (1 - 1e-9) > 0
        assert m["wall_s"] >= m["modelled_s"] > 0  # every emulated phase was waited out
        adapters.append(load_file(Path(row["adapter"]) / "adapter_model.safetensors"))
    assert all(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0] if "lora_B" in k)  # own data, own adapter
    assert len({json.dumps(r["losses"]) for r in report["owners"]}) == len(report["owners"])  # own data each


@pytest.mark.he
def test_four_owners_at_their_planned_sets_and_shares(micro_plan, tmp_path):
    lp = load_plan(micro_plan)
    assert sorted(o.param_set for o in lp.owners) == ["p128", "p256", "p256", "p256"]
    report = run_federate(FederateConfig(plan=micro_plan, out=tmp_path / "run"), echo=lambda _: None)
    check_run(report, micro_plan)
    assert json.loads((tmp_path / "run" / "federate.json").read_text())["owners"][0]["owner"] == 1


@pytest.mark.he
def test_the_same_owners_at_the_equal_bandwidth_baseline(micro_plan, tmp_path):
    """The baseline's allocation from the same plan file, run and measured like the plan's: each owner at a quarter of
    the cell's bandwidth, its own adapter still its solo run's (the allocation changes time and energy, not the result)."""
    lp = load_plan(micro_plan, "equal_bandwidth")
    assert lp.allocation == "equal_bandwidth" and [o.bandwidth_mhz for o in lp.owners] == pytest.approx([5.0] * 4)
    assert lp.objective == json.loads(micro_plan.read_text())["baselines"]["equal_bandwidth"]["objective"]
    report = run_federate(FederateConfig(plan=micro_plan, out=tmp_path / "run", allocation="equal_bandwidth"), echo=lambda _: None)
    check_run(report, micro_plan, "equal_bandwidth")
    assert report["allocation"] == "equal_bandwidth"
    assert report["objective"]["planned"] == pytest.approx(lp.objective, rel=1e-9)
    assert [r["bandwidth_mhz"] for r in report["owners"]] == pytest.approx([5.0] * 4)
    obj = report["objective"]
    assert obj["measured"] == pytest.approx(obj["measured_energy_j"] - lp.omega * obj["security_bits"])


def test_an_unknown_or_infeasible_baseline_is_refused(micro_plan, tmp_path):
    with pytest.raises(ConfigError, match="has no baseline 'fastest'.*"):
        run_federate(FederateConfig(plan=micro_plan, out=tmp_path / "run", allocation="fastest"))
    bad = _mutated(micro_plan, tmp_path, lambda d: d["baselines"].update(max_power=None))
    with pytest.raises(ConfigError, match="baseline 'max_power' is infeasible"):
        run_federate(FederateConfig(plan=bad, out=tmp_path / "run", allocation="max_power"))
    assert not (tmp_path / "run").exists()


def fast_cell(text: str, deadline: float) -> str:
    """Devices and server at the machine's clock, a wide link: the emulation stretches little, the test stays short."""
    for key in ("max_cpu_ghz = 1.0", "max_cpu_ghz = 0.8", "max_cpu_ghz = 1.2", "max_cpu_ghz = 0.6"):
        text = text.replace(key, "max_cpu_ghz = 2.3")
    return (text.replace("bandwidth_mhz = 20.0", "bandwidth_mhz = 100.0").replace("downlink_mbps = 1000.0", "downlink_mbps = 10000.0")
            .replace("deadline_s = 30.0", f"deadline_s = {deadline}"))


@pytest.mark.he
@pytest.mark.parametrize("owners", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_owners_on_the_first_block_of_smollm2(tmp_path, owners):
    """The real pretrained model, its first decoder block: the owners share one worker, each adapter is its solo run's.
    Two owners on a fast cell for the default run; four on the 30 s cell take 200 s on the loaded 2-core machine (slow)."""
    cell = cell_text("smollm2-135m", 1, 30.0, owners=owners)
    plan = make_plan(tmp_path, fast_cell(cell, 10.0) if owners == 2 else cell, 0.005)
    report = run_federate(FederateConfig(plan=plan, out=tmp_path / "run", max_docs=20), echo=lambda _: None)
    check_run(report, plan)
    assert len(report["owners"]) == owners
    assert report["workload"] == {"model": "smollm2-135m", "layers": 1, "seq_len": 16, "batch": 1, "scheme": "rlwe"}


@pytest.mark.he
@pytest.mark.slow
def test_two_owners_on_the_whole_of_smollm2(tmp_path):
    """All 30 decoder blocks (every outsourced linear of the real model), two owners on a fast cell at a 300 s
    deadline (200 s is infeasible for the planner): each adapter is its solo run's and trained every block."""
    plan = make_plan(tmp_path, fast_cell(cell_text("smollm2-135m", 0, 30.0, owners=2), 300.0), 0.005)
    report = run_federate(FederateConfig(plan=plan, out=tmp_path / "run", max_docs=20), echo=lambda _: None)
    check_run(report, plan)
    assert report["workload"] == {"model": "smollm2-135m", "layers": 0, "seq_len": 16, "batch": 1, "scheme": "rlwe"}
    for row in report["owners"]:  # the step reached every block: each of the 30 x 7 linears' lora_B moved from zero
        adapter = load_file(Path(row["adapter"]) / "adapter_model.safetensors")
        moved = {k.split(".layers.")[1].split(".", 1)[0] for k, v in adapter.items() if "lora_B" in k and v.abs().max() > 0}
        assert moved == {str(i) for i in range(30)} and sum("lora_B" in k for k in adapter) == 30 * 7


def _mutated(micro_plan: Path, tmp_path: Path, change) -> Path:
    data = json.loads(micro_plan.read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _owner(i, key, value):
    def change(d):
        d["plan"]["owners"][i][key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("inputs"), "holds no cell and cost fit"),
    (lambda d: d["plan"]["owners"].pop(), "plans 3 owners but its cell has 4"),
    (_owner(0, "param_set", "p999"), "param_set 'p999' is not one of"),
    (_owner(1, "bandwidth_mhz", -1.0), "must be positive numbers"),
    (_owner(2, "server_ghz", "fast"), "must be positive numbers"),
    (lambda d: d["plan"]["owners"][0].pop("cpu_ghz"), "owner 1 lacks one of"),
    (_owner(0, "bandwidth_mhz", 50.0), "of the cell's bandwidth_mhz = 20"),
    (_owner(3, "cpu_ghz", 0.9), "above its cell's maximum"),
    (_owner(1, "cpu_ghz", 0.01), "misses the cell's deadline"),
    (lambda d: d["inputs"].update(cell=d["inputs"]["cell"].replace("max_cpu_ghz = 1.2", "max_cpu_ghz = 9.0"))
     or d["plan"]["owners"][2].update(cpu_ghz=5.0), "above this machine's"),
    (lambda d: d["inputs"].update(cell=d["inputs"]["cell"].replace("batch = 1", "batch = 2")), "not a multiple of"),
    (lambda d: d.update(plan=[]), "not a `hetune plan privtuner` output"),
])
def test_bad_plans_are_refused_before_anything_runs(micro_plan, tmp_path, change, message):
    bad = _mutated(micro_plan, tmp_path, change)
    with pytest.raises(ConfigError, match=message):
        run_federate(FederateConfig(plan=bad, out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_plan_file_errors_on_the_command_line(run_cli, tmp_path):
    code, _, err = run_cli("federate", "privtuner", "--plan", tmp_path / "none.json", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err and "hetune plan privtuner --cell" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run_cli("federate", "privtuner", "--plan", tmp_path / "bad.json", "--out", tmp_path / "o")
    assert code == 2 and "not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_unknown_allocation_on_the_command_line(run_cli, micro_plan, tmp_path):
    code, _, err = run_cli("federate", "privtuner", "--plan", micro_plan, "--allocation", "fastest", "--out", tmp_path / "o")
    assert code == 2 and "has no baseline 'fastest'" in err and "equal_bandwidth" in err
    assert not (tmp_path / "o").exists()


def test_workload_layers():
    assert len(workload_products("smollm2-135m", 1)) == 7  # qkv, o, gate_up, down forward; o, gate_up, down backward
    assert len(workload_products("smollm2-135m")) == 30 * 8 - 1
    with pytest.raises(ConfigError, match="has only 30 decoder blocks"):
        workload_products("smollm2-135m", 31)
    with pytest.raises(ConfigError, match="layers=-1"):
        from hetune.protocols.privtuner.cell import parse_cell
        import tomllib

        parse_cell(tomllib.loads(cell_text("micro-llama", -1, 5.0)))
