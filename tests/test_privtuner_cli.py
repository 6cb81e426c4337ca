"""PrivTuner's inputs and outputs: cell files (good and malformed), the CLI, the cost model's arithmetic."""

import json
import math
import warnings

import numpy as np
import pytest

from hetune.crypto.registry import get_scheme
from hetune.errors import ConfigError
from hetune.protocols.privtuner.cell import cell_to_toml, load_cell, parse_cell, path_loss_gain, random_cell
from hetune.protocols.privtuner.costs import load_costs, per_sample, workload_products

warnings.filterwarnings("ignore", message="Solution may be inaccurate")

GOOD = {
    "cell": {"bandwidth_mhz": 10.0, "noise_dbm_per_hz": -174.0, "deadline_s": 120.0, "server_ghz": 4000.0},
    "workload": {"model": "micro-llama", "seq_len": 16},
    "owner": [
        {"samples": 10, "distance_m": 100.0, "max_power_w": 0.5, "max_cpu_ghz": 1.5},
        {"samples": 6, "gain_db": -110.0, "max_power_w": 0.3, "max_cpu_ghz": 1.0},
    ],
}


def mutated(path, value):
    """GOOD with one entry replaced (value None: removed)."""
    data = json.loads(json.dumps(GOOD))
    *parents, key = path
    node = data
    for p in parents:
        node = node[p]
    if value is None:
        del node[key]
    else:
        node[key] = value
    return data


def test_good_cell_parses_with_path_loss():
    cell = parse_cell(GOOD)
    assert len(cell.owners) == 2 and cell.kappa == 1e-28 and math.isinf(cell.server_memory_gib)
    # 128.1 + 37.6 log10(0.1) = 90.5 dB at 100 m
    assert cell.owners[0].gain_db == pytest.approx(-90.5)
    assert cell.owners[1].gain == pytest.approx(1e-11)
    assert cell.noise_w_per_hz == pytest.approx(10 ** (-17.4) / 1000)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("cell", "bandwidth_mhz"), None, "missing key 'bandwidth_mhz'"),
        (("cell", "deadline_s"), "2 min", "deadline_s='2 min' must be a number"),
        (("cell", "deadline_s"), True, "must be a number"),
        (("cell", "server_ghz"), -5.0, "server_ghz=-5.0 must be > 0"),
        (("cell", "bandwidth"), 2e7, "(?s)unknown key.*bandwidth.*units are part of the name"),
        (("owner", 0, "samples"), 2.5, "must be a whole number"),
        (("owner", 0, "max_power_w"), 0, "max_power_w=0.0 must be a positive"),
        (("owner", 1, "distance_m"), 50.0, "exactly one of distance_m and gain_db"),
        (("owner", 1, "gain_db"), 3.0, "must be negative"),
        (("workload", "seq_len"), "16", "seq_len, batch and layers integers"),
        (("workload", "layers"), -1, "layers=-1 >= 0"),
        (("workload", "batch"), 0, "batch=0 must be >= 1"),
        (("owner",), [], "no \\[\\[owner\\]\\] entries"),
    ],
)
def test_malformed_cells_get_a_clear_error(path, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_cell(mutated(path, value), "cell.toml")
    assert "cell.toml" in str(err.value) and err.value.hint


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cell\nbandwidth_mhz = 10")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_cell(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_cell(tmp_path / "nope.toml")


def test_random_cell_round_trips_through_toml(tmp_path):
    cell = random_cell(5, seed=4, server_memory_gib=3.0, batch=8)
    path = tmp_path / "c.toml"
    path.write_text(cell_to_toml(cell))
    back = load_cell(path)
    assert back.owners == cell.owners and back.bandwidth_mhz == cell.bandwidth_mhz and back.server_memory_gib == 3.0
    assert back.batch == 8 and parse_cell(GOOD).batch == 4  # `hetune train --batch-size`'s default
    assert 50 <= min(o.distance_m for o in back.owners) and max(o.distance_m for o in back.owners) <= 500
    assert back.owners[0].gain == pytest.approx(path_loss_gain(back.owners[0].distance_m))


def test_per_sample_costs_follow_the_protocol():
    products = workload_products("micro-llama")
    assert len(products) == 2 * 4 + 7  # forward of every op; backward of all but layer 0's qkv
    for scheme in ("rlwe", "glwe"):
        costs = load_costs(scheme=scheme)
        sch = get_scheme(scheme)
        assert costs.scheme == scheme and tuple(costs.sets) == sch.param_sets
        for name in sch.param_sets:
            one = per_sample(costs, name, "micro-llama", 16, batch=4)
            expected = sum(sch.request_bytes(sch.params(name), 64, pr.k) for pr in products) * 8e-6 / 4
            assert one.upload_mbit == pytest.approx(expected)  # exact request sizes, shared by the batch
            assert one.security_bits == sch.params(name).security.bits and one.key_bytes == sch.params(name).session_key_bytes
    rlwe = load_costs()
    up = {n: per_sample(rlwe, n, "micro-llama", 16, batch=4).upload_mbit for n in ("p128", "p192", "p256")}
    assert up["p192"] == up["p256"] == pytest.approx(2 * up["p128"], rel=1e-4)  # tokens pad to N = 4096 vs 2048
    # rlwe: 16 or 64 sequences of 16 tokens fill at most one ring of 2,048 coefficients, so the
    # per-sample upload falls with the batch; GLWE encrypts each token alone and does not care
    one, four = (per_sample(rlwe, "p128", "micro-llama", 16, batch=b) for b in (16, 64))
    assert one.upload_mbit == pytest.approx(4 * four.upload_mbit, rel=1e-4)
    glwe = load_costs(scheme="glwe")
    one, four = (per_sample(glwe, "p128", "micro-llama", 16, batch=b) for b in (16, 64))
    assert one.upload_mbit == pytest.approx(four.upload_mbit, rel=1e-3)
    assert one.server_gcycles == pytest.approx(four.server_gcycles, rel=1e-3)
    # GLWE's micro-llama rows are narrower than N: p256 pads them to 4096 values, p80 to 1024
    up = {n: per_sample(glwe, n, "micro-llama", 16).upload_mbit for n in ("p80", "p128", "p256")}
    assert up["p80"] < up["p128"] < up["p256"]
    # per sample, GLWE's worker pays a key switch per output value: rlwe's is far cheaper
    assert per_sample(rlwe, "p128", "micro-llama", 16).server_gcycles < 0.1 * per_sample(glwe, "p128", "micro-llama", 16).server_gcycles


def test_cost_files_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="ships no cost fit|unknown"):
        load_costs(scheme="nope")
    glwe_file = tmp_path / "glwe.json"
    glwe_file.write_text(json.dumps(load_costs(scheme="glwe").to_dict()))
    with pytest.raises(ConfigError, match="is for scheme 'glwe', not 'rlwe'"):
        load_costs(glwe_file, scheme="rlwe")
    data = load_costs().to_dict()
    data["sets"]["p80"] = data["sets"]["p128"]  # a GLWE set in an rlwe file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'p80' is not one of scheme 'rlwe'"):
        load_costs(bad)
    del data["scheme"]  # a cost file of the GLWE-only format
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not a hetune cost file"):
        load_costs(bad)


def test_cli_plans_the_example_and_writes_json(run_cli, tmp_path):
    cell = tmp_path / "cell.toml"
    cell.write_text(cell_to_toml(random_cell(3, seed=0, server_memory_gib=1.0)))
    out = tmp_path / "plan"
    code, stdout, stderr = run_cli("plan", "privtuner", "--cell", cell, "--omega", "0.002", "--out", out, "--no-sweep")
    assert code == 0, stderr
    assert "scheme rlwe" in stdout and "privtuner" in stdout and "equal_bandwidth" in stdout and "max_power" in stdout
    result = json.loads((out / "privtuner.json").read_text())
    assert result["scheme"] == "rlwe" and result["sets"] == ["p128", "p192", "p256"] and result["phi"] == [128, 192, 256]
    assert len(result["plan"]["owners"]) == 3 and result["omega"] == 0.002
    assert not list(out.glob("*.tmp"))
    # GLWE sessions hold compression keys: the worker's memory couples the owners' choices
    code, stdout, stderr = run_cli("plan", "privtuner", "--cell", cell, "--scheme", "glwe", "--out", out, "--no-sweep")
    assert code == 0, stderr
    result = json.loads((out / "privtuner.json").read_text())
    assert result["scheme"] == "glwe" and result["sets"] == ["p80", "p128", "p192", "p256"]
    mem = {"p80": 48, "p128": 128, "p192": 512, "p256": 512}
    assert sum(mem[o["param_set"]] for o in result["plan"]["owners"]) <= 1024  # the memory budget holds


def test_cli_refuses_infeasible_and_malformed_cells(run_cli, tmp_path):
    cell = tmp_path / "tight.toml"
    cell.write_text(cell_to_toml(random_cell(2, seed=0, deadline_s=1.0)))
    out = tmp_path / "never"
    code, _, stderr = run_cli("plan", "privtuner", "--cell", cell, "--out", out)
    assert code == 7 and "owner 1: deadline 1 s < minimum" in stderr and "-bound" in stderr
    assert not out.exists()  # nothing half-written
    bad = tmp_path / "bad.toml"
    bad.write_text("[cell]\nbandwidth_mhz = 10\n")
    code, _, stderr = run_cli("plan", "privtuner", "--cell", bad, "--out", out)
    assert code == 2 and "missing key" in stderr


def test_cli_cell_and_params(run_cli, tmp_path):
    path = tmp_path / "gen.toml"
    code, _, _ = run_cli("plan", "cell", "--owners", "7", "--seed", "3", "--out", path)
    assert code == 0 and len(load_cell(path).owners) == 7
    code, stdout, _ = run_cli("plan", "params")
    assert code == 0 and all(name in stdout for name in ("rlwe", "glwe", "p80", "p128", "p192", "p256"))


def test_cli_measure_validates_before_measuring(run_cli, tmp_path):
    out = tmp_path / "costs.json"
    code, _, stderr = run_cli("plan", "measure", "--scheme", "ckks", "--out", out)
    assert code == 2 and "scheme 'ckks' is unknown" in stderr
    code, _, stderr = run_cli("plan", "measure", "--sets", "p128,p80", "--out", out)  # p80 is GLWE's, not rlwe's
    assert code == 2 and "'p80' is not allow-listed for scheme 'rlwe'" in stderr
    assert not out.exists()


def test_sweep_writes_the_plot(tmp_path):
    from hetune.protocols.privtuner.run import PlanConfig, run_plan

    cell = tmp_path / "c.toml"
    cell.write_text(cell_to_toml(random_cell(2, seed=1)))
    result = run_plan(PlanConfig(cell=cell, omega=1e-3, out=tmp_path / "o", sweep_points=2))
    rows = result["sweep"]["rows"]
    assert len(rows) == 3 and (tmp_path / "o" / "energy_vs_omega.png").stat().st_size > 10_000
    bits = [r["privtuner"]["privacy_bits"] for r in rows]
    assert bits == sorted(bits)  # omega ascending, privacy never falls
    assert all(np.isfinite(r["privtuner"]["energy_j"]) for r in rows)
