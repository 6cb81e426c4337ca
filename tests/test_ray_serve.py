"""The worker on Ray Serve: stateless replicas behind one endpoint give the bit-exact step of one process.

The cluster tests start a local Ray (2 CPUs, no dashboard) once per module: 15-25 s to
start it and deploy two replicas on these 2-core CPUs, then 2-10 s per step through the
proxy and about 10 s per further deployment. The replica-restart test waits for Serve to
start a new replica and is in the slow tier.
"""

import collections
import socket
import time
import warnings

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_hybrid_lora import assert_equal_grads, lora_grads

from hetune.compile.bundle import load_bundle, read_manifest
from hetune.crypto.registry import resolve_params
from hetune.crypto.keys import generate_keys
from hetune.errors import ConfigError
from hetune.protocols.hybrid_lora.owner.client import build_private_model
from hetune.protocols.hybrid_lora.owner.remote import WorkerClient
from hetune.protocols.hybrid_lora.worker.server import ServeConfig, Session, create_app
from hetune.serving.signed_sessions import Claims, LocalLedger, SessionTokens, SignedSessions, load_session_key

serve = pytest.importorskip("ray.serve")
ray_serve = pytest.importorskip("hetune.protocols.hybrid_lora.worker.ray_serve")

KEY = b"k" * 32
OP = "layers.1.o"  # 32 x 32


@pytest.fixture(scope="module")
def ciphertext():
    """A real 1 x 32 request body: a token that passes gets a 200."""
    return generate_keys("rlwe").encrypt(np.arange(32)[None, :])


def signed_store(ledger=None, max_sessions=8, owner_sessions=None):
    return SignedSessions(SessionTokens(KEY), 60.0, ledger or LocalLedger(),
                          lambda c, token: Session(token, resolve_params(c.scheme, c.param_set), None, c.owner),
                          max_sessions, owner_sessions)


# ---- tokens and slices, in this process ----

def test_tokens_carry_their_claims_and_refuse_tampering():
    tokens = SessionTokens(KEY)
    claims = Claims("ab" * 16, "rlwe", "p192", 2_000_000_000)
    token = tokens.issue(claims)
    assert tokens.verify(token) == claims
    version, body, tag = token.split(".")
    forged = SessionTokens(b"x" * 32).issue(claims)
    other_claims = tokens.issue(Claims("ab" * 16, "rlwe", "p80", 2_000_000_000)).split(".")[1]
    for bad in (forged, f"{version}.{other_claims}.{tag}", f"v2.{body}.{tag}", token[:-2], "", None, "a.b"):
        assert tokens.verify(bad) is None
    assert KEY.decode() not in repr(tokens)


def test_session_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HETUNE_SESSION_KEY", raising=False)
    assert load_session_key() is None
    monkeypatch.setenv("HETUNE_SESSION_KEY", "e" * 40)
    assert load_session_key() == b"e" * 40
    (tmp_path / "key").write_text("f" * 40 + "\n")
    assert load_session_key(tmp_path / "key") == b"f" * 40
    (tmp_path / "short").write_text("too short")
    with pytest.raises(ConfigError, match="at least 32"):
        load_session_key(tmp_path / "short")
    with pytest.raises(ConfigError, match="cannot read"):
        load_session_key(tmp_path / "missing")


def test_signed_sessions_in_the_app(micro_bundle, ciphertext):
    """A token of ours opens its session; another key's, another session's, an expired one or a closed session's do not."""
    client = TestClient(create_app(load_bundle(micro_bundle), sessions=signed_store()))
    s = client.post("/v2/sessions").json()
    sid = s["session_id"]
    assert s["token"].startswith("v1.") and client.get("/v2/health").json()["sessions"] == 1

    def status(token):
        return client.post(f"/v2/sessions/{sid}/ops/{OP}/forward", params={"rows": 1, "cols": 32}, content=ciphertext,
                           headers={"authorization": f"Bearer {token}"}).status_code

    assert status(s["token"]) == 200
    assert status(SessionTokens(b"x" * 32).issue(Claims(sid, "rlwe", "p128", 2_000_000_000))) == 401
    assert status(SessionTokens(KEY).issue(Claims("cd" * 16, "rlwe", "p128", 2_000_000_000))) == 401
    assert status(SessionTokens(KEY).issue(Claims(sid, "rlwe", "p128", int(time.time()) - 1))) == 404
    assert status("nope") == 401
    assert client.delete(f"/v2/sessions/{sid}", headers={"authorization": f"Bearer {s['token']}"}).status_code == 204
    assert status(s["token"]) == 404 and client.get("/v2/health").json()["sessions"] == 0
    p192 = client.post("/v2/sessions", params={"param_set": "p192"}).json()["token"]
    assert SessionTokens(KEY).verify(p192).param_set == "p192"
    r = client.post("/v2/sessions", params={"scheme": "glwe"})
    assert r.status_code == 422 and "use rlwe with --ray" in r.json()["error"]


def test_a_slice_loads_only_its_blocks(micro_bundle):
    full = load_bundle(micro_bundle)
    first, second = (load_bundle(micro_bundle, layers=range(lo, hi)) for lo, hi in ((0, 1), (1, 2)))
    assert {op.layer for op in first.manifest.ops} == {0} and {op.layer for op in second.manifest.ops} == {1}
    assert set(first.tensors) | set(second.tensors) == set(full.tensors) and not set(first.tensors) & set(second.tensors)
    for name, tensor in second.tensors.items():
        assert torch.equal(tensor, full.tensors[name])


def test_ray_config_is_checked(micro_bundle):
    assert ray_serve.parse_layer_ranges("0:1, 1:2") == ((0, 1), (1, 2))
    with pytest.raises(ConfigError, match="START:STOP"):
        ray_serve.parse_layer_ranges("0-1")
    for bad in ({"layer_ranges": ((0, 1), (2, 3))}, {"layer_ranges": ((1, 2),)}, {"replicas": 0},
                {"min_replicas": 2}, {"min_replicas": 3, "max_replicas": 2}, {"num_cpus": 0}):
        with pytest.raises(ConfigError):
            ray_serve.RayServeConfig(**bad)
    with pytest.raises(ConfigError, match="the bundle has 2 blocks"):
        ray_serve.RayServeConfig(layer_ranges=((0, 1),)).check_covers(read_manifest(micro_bundle))
    assert ray_serve.RayServeConfig(min_replicas=1, max_replicas=4, num_cpus=2).scaling() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}}
    with pytest.raises(ConfigError, match="app args need"):
        ray_serve.app_builder({"bundle": str(micro_bundle), "replica": "2"})
    assert isinstance(ray_serve.app_builder({"bundle": str(micro_bundle), "replicas": 2, "layer_ranges": "0:1,1:2"}),
                      serve.Application)


def test_admission_limits_hold_across_replicas_sharing_a_ledger(micro_bundle, tmp_path, ciphertext):
    """Two apps (as two replicas) over one ledger: the owner's session cap and request rate are the cluster's,
    a session closed through one stops counting on the other, and strangers cost nothing."""
    from hetune.serving.admission import Admission, OwnerLimits, add_owner, read_keys_file

    keys_file = tmp_path / "keys.txt"
    key = add_owner(keys_file, "clinic")
    cfg = ServeConfig(api_keys=keys_file, owner_limits=OwnerLimits(sessions=1, requests_per_minute=6))
    ledger, bundle = LocalLedger(), load_bundle(micro_bundle)
    replicas = []
    for _ in range(2):
        store = signed_store(ledger, owner_sessions=1)
        admission = Admission(read_keys_file(keys_file), cfg.owner_limits, store.owned_by, lambda o: ledger.take(o, 6))
        replicas.append(TestClient(create_app(bundle, cfg, sessions=store, admission=admission)))
    a, b = replicas
    auth = {"authorization": f"Bearer {key}"}
    s = a.post("/v2/sessions", headers=auth).json()  # request 1 of 6
    assert SessionTokens(KEY).verify(s["token"]).owner == "clinic"  # the token names whom to charge
    r = b.post("/v2/sessions", headers=auth)  # 2: the cap is the cluster's
    assert r.status_code == 429 and "1 concurrent sessions" in r.json()["error"]
    for client in (a, b):
        assert client.post("/v2/sessions").status_code == 401 and client.get("/v2/health").status_code == 401
    op = f"/v2/sessions/{s['session_id']}/ops/{OP}/forward"
    mine = {"authorization": f"Bearer {s['token']}"}
    assert [c.post(op, params={"rows": 1, "cols": 32}, content=ciphertext, headers=mine).status_code
            for c in (a, b)] == [200, 200]  # 3 and 4, on either replica
    assert b.delete(f"/v2/sessions/{s['session_id']}", headers=mine).status_code == 204  # 5
    s = a.post("/v2/sessions", headers=auth).json()  # 6: closed through b, so a sees room again
    r = b.post(f"/v2/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": 1, "cols": 32}, content=ciphertext,
               headers={"authorization": f"Bearer {s['token']}"})
    assert r.status_code == 429 and "6 requests per minute" in r.json()["error"]  # 7: the rate is the cluster's


def test_ledger_tables_are_bounded():
    ledger = LocalLedger()
    until = time.time() + 60
    assert [ledger.open(f"s{i}", None, until, 3, None)[0] for i in range(5)] == [None, None, None, "worker", "worker"]
    assert ledger.open("x", "bank", until, 9, 1)[0] is None and ledger.open("y", "bank", until, 9, 1)[0] == "owner"
    ledger.revoke("s0", until)
    assert ledger.live() == 3 and ledger.live("bank") == 1 and ledger.check("s0", ledger.epoch) == "closed"
    ledger.open("old", None, time.time() - 1, 9, None)  # already expired: pruned at once
    ledger.revoke("gone", time.time() - 1)
    assert ledger.live() == 3 and ledger.check("gone", ledger.epoch) is None


# ---- the body budget and the epoch in the shared ledger (issue 20), in this process ----

def shared_budgets(ledger, lease_s=60.0, total=100, per_holder=60):
    """Two replicas' budgets over one ledger, each of which alone would take a full budget."""
    from hetune.serving.http_api import BodyBudget
    from hetune.serving.signed_sessions import LedgerBodies

    return [BodyBudget(total, per_holder, shared=LedgerBodies(ledger, name, lease_s)) for name in ("a", "b")]


def refused(budget, holder, size):
    from hetune.serving.http_api import Refusal

    try:
        with budget.hold(holder, size):
            return None
    except Refusal as refusal:
        return refusal.status


def test_body_budget_is_shared_by_replicas_of_one_ledger():
    """Bytes held on one replica count on the other: per holder (429) and in all (503), before a byte is read;
    a release frees them for every replica. Without the ledger each replica would take its own full budget."""
    a, b = shared_budgets(LocalLedger())
    with a.hold("clinic", 60):
        assert refused(b, "clinic", 10) == 429  # the owner's 60 are held on a
        assert refused(b, "bank", 50) == 503  # 60 + 50 > 100 in all
        assert refused(b, "bank", 40) is None and b.used == 0  # fits, and is given back on leaving
        assert refused(shared_budgets(LocalLedger())[1], "clinic", 60) is None  # another app's ledger: its own budget
    assert refused(b, "clinic", 60) is None and refused(b, "bank", 100) == 413  # released through a; over any budget
    with a.hold("clinic", 30), b.hold("clinic", 30):  # one owner's holds on two replicas add up
        assert refused(a, "clinic", 1) == 429 and refused(b, "clinic", 1) == 429


def test_a_dead_replicas_holds_expire_and_a_live_ones_do_not(monkeypatch):
    """A replica that dies mid-request stops re-reporting: its bytes are free again one lease later.
    One that keeps reporting keeps its holds however long the product takes."""
    ledger = LocalLedger()
    a, b = shared_budgets(ledger, lease_s=0.3)
    dying = a.hold("clinic", 60)
    dying.__enter__()  # a held body whose replica dies: never released
    assert refused(b, "clinic", 60) == 429
    time.sleep(0.4)
    assert refused(b, "clinic", 60) is None  # a's lease ran out
    with b.hold("clinic", 60):
        for _ in range(4):  # 0.6 s, two leases, with b reporting
            time.sleep(0.15)
            b.renew()
        assert refused(a, "bank", 50) == 503  # b's 60 still count
    b.renew()  # reports nothing held
    assert refused(b, "bank", 60) is None and refused(b, "clinic", 60) is None


def test_a_restarted_ledger_waits_one_lease_for_the_replicas_reports(monkeypatch):
    """A new ledger after a restart knows no holds: it grants none (503) until the replicas have re-reported theirs,
    then counts them."""
    from hetune.serving import signed_sessions

    monkeypatch.setattr(signed_sessions, "LEASE_S", 0.3)
    ledger = LocalLedger(restarted=True)
    a, b = shared_budgets(ledger)
    assert refused(a, "clinic", 10) == 503
    ledger.renew("b", {"bank": 80}, 60.0)  # b still holds a body from before the restart
    time.sleep(0.35)
    assert refused(a, "clinic", 30) == 503 and refused(a, "clinic", 20) is None


def test_a_ledger_restart_voids_earlier_sessions_and_keeps_the_caps(micro_bundle, ciphertext):
    """A restart forgets the closed sessions and the counts: every token of the earlier ledger is refused with a 404
    that says why (so a closed session never comes back and the caps count every usable session), and a
    restarted ledger's buckets start empty."""
    store = signed_store(max_sessions=1)
    client = TestClient(create_app(load_bundle(micro_bundle), sessions=store))
    old = client.post("/v2/sessions").json()
    auth = {"authorization": f"Bearer {old['token']}"}
    assert client.delete(f"/v2/sessions/{old['session_id']}", headers=auth).status_code == 204
    live = client.post("/v2/sessions").json()  # the one session the cap allows
    store._ledger = LocalLedger(restarted=True)  # the actor restarted: it knows neither
    for s in (old, live):
        r = client.post(f"/v2/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": 1, "cols": 32},
                        content=ciphertext, headers={"authorization": f"Bearer {s['token']}"})
        assert r.status_code == 404 and "ledger restarted" in r.json()["error"] and "open a new session" in r.json()["error"]
    new = client.post("/v2/sessions").json()  # the cap counts this one only: the old ones are void
    assert client.post("/v2/sessions").status_code == 429
    assert SessionTokens(KEY).verify(new["token"]).epoch == store._ledger.epoch != SessionTokens(KEY).verify(live["token"]).epoch
    assert store._ledger.take("clinic", 60) > 0  # a restarted ledger's bucket is empty at first ...
    assert LocalLedger().take("clinic", 60) == 0  # ... a first start's is full


def test_the_owner_client_reopens_after_a_ledger_restart(micro_bundle, ciphertext):
    """The data owner's client takes the 404 for a void session like a restarted worker's: it opens a new session
    and the product goes through."""
    from hetune.serving.http_api import LoopbackServer

    store = signed_store()
    with LoopbackServer(create_app(load_bundle(micro_bundle), sessions=store), "worker", "ledger-restart") as server:
        worker = WorkerClient(server.url)
        worker.open(resolve_params("rlwe", None), b"")
        before = worker.session_id
        assert worker.run(OP, "forward", ciphertext, 1, 32)[0]
        store._ledger = LocalLedger(restarted=True)
        assert worker.run(OP, "forward", ciphertext, 1, 32)[0] and worker.session_id != before
        worker.close()


def test_tls_that_cannot_be_applied_is_a_hard_error(tmp_path):
    from types import SimpleNamespace

    def http(host="127.0.0.1", cert=None, key=None):
        return SimpleNamespace(host=host, port=8765, ssl_certfile=cert, ssl_keyfile=key)

    plain = ServeConfig()
    ray_serve.check_endpoint(http(), plain, require_tls=False)  # loopback, nothing asked: fine
    with pytest.raises(ConfigError, match="TLS was asked for.*plain http on 127.0.0.1:8765.*cannot be applied"):
        ray_serve.check_endpoint(http(), plain, require_tls=True)
    with pytest.raises(ConfigError, match="listen on 0.0.0.0 and this app has no TLS and no API keys"):
        ray_serve.check_endpoint(http("0.0.0.0"), plain, require_tls=False)
    ray_serve.check_endpoint(http("0.0.0.0"), ServeConfig(insecure=True), require_tls=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("")
    ray_serve.check_endpoint(http("0.0.0.0", "/c.pem", "/k.pem"), ServeConfig(api_keys=keys), require_tls=True)


def test_app_builder_takes_keys_limits_and_tls(micro_bundle, tmp_path):
    from hetune.serving.admission import add_owner

    add_owner(tmp_path / "keys.txt", "clinic")
    app = ray_serve.app_builder({"bundle": str(micro_bundle), "api_keys": str(tmp_path / "keys.txt"), "owner_sessions": 3,
                                 "owner_rpm": 60, "max_sessions": 4, "body_budget_mib": 256, "owner_body_budget_mib": 128,
                                 "body_timeout": 30, "require_tls": True, "insecure": "false"})
    args = app._bound_deployment.init_args
    cfg, require_tls = args[1], args[4]
    assert (cfg.owner_limits.sessions, cfg.owner_limits.requests_per_minute, cfg.max_sessions) == (3, 60, 4)
    assert (cfg.body_budget_mib, cfg.owner_body_budget_mib, cfg.body_timeout_s, require_tls) == (256, 128, 30.0, True)
    assert cfg.api_keys.is_absolute()
    with pytest.raises(ConfigError, match="not true or false"):
        ray_serve.app_builder({"bundle": str(micro_bundle), "require_tls": "yes"})
    with pytest.raises(ConfigError, match="cannot read API keys file"):
        ray_serve.app_builder({"bundle": str(micro_bundle), "api_keys": str(tmp_path / "missing.txt")})


# ---- on a local Ray cluster ----

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with Serve's proxy on a free loopback port; yields (base URL, key file)."""
    import ray

    key_file = tmp_path_factory.mktemp("ray") / "session.key"
    key_file.write_text("s" * 43)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}", key_file
    serve.shutdown()
    ray.shutdown()


def deploy(cluster, bundle, name, **rc):
    """One app per test case under /<name>; 0.25 logical CPU per replica so several fit on 2."""
    url, key_file = cluster
    app = ray_serve.build_app(bundle, ServeConfig(), ray_serve.RayServeConfig(num_cpus=0.25, session_key_file=key_file, **rc))
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{url}/{name}"


@pytest.fixture(scope="module")
def two_replicas(cluster, micro_bundle):
    return deploy(cluster, micro_bundle, "two", replicas=2)


@pytest.fixture(scope="module")
def quantized(micro_bundle):
    return lora_grads(build_private_model("micro-llama", "quantized", bundle=micro_bundle))


@pytest.fixture
def replicas_seen(monkeypatch):
    """Which replica answered each request (its x-worker-replica header), in order."""
    seen = []
    original = WorkerClient._request

    def recording(self, method, path, **kwargs):
        response = original(self, method, path, **kwargs)
        seen.append(response.headers.get(ray_serve.REPLICA_HEADER))
        return response

    monkeypatch.setattr(WorkerClient, "_request", recording)
    return seen


def test_two_replicas_give_the_quantized_step_bit_for_bit(two_replicas, quantized, replicas_seen):
    pm = build_private_model("micro-llama", "remote", workers=(two_replicas,))
    assert_equal_grads(lora_grads(pm), quantized)
    pm.close()
    assert len(set(replicas_seen)) == 2, collections.Counter(replicas_seen)  # both served


def test_hints_fetched_through_one_replica_serve_products_on_the_other(two_replicas, quantized, replicas_seen, tmp_path):
    """Fixed masks on two replicas: the hints (streamed through Serve's proxy) come from whichever replica Serve
    picks, the products go to either, and the step equals quantized bit for bit."""
    from hetune.crypto.keys import fixed_mask_keys

    pm = build_private_model("micro-llama", "remote", workers=(two_replicas,), keys=fixed_mask_keys("p128", tmp_path))
    hints_from = len(replicas_seen)
    pm.backend.prefetch_hints(3)
    hint_replicas = set(replicas_seen[hints_from:])
    products_from = len(replicas_seen)
    grads = lora_grads(pm)
    product_replicas = set(replicas_seen[products_from:])
    assert pm.backend.stats.hint_bytes > 0
    assert len(list(pm.backend.keys.cache.dir.glob("*.hint"))) == 2 * len(pm.backend.codecs)  # each op and direction
    pm.close()
    assert_equal_grads(grads, quantized)
    # Serve routes at random: with products on both replicas, all 15 landing on their own hint's replica has odds 2^-15.
    assert len(product_replicas) == 2 and hint_replicas, (hint_replicas, product_replicas)


def test_forged_expired_and_closed_tokens_are_refused_by_every_replica(two_replicas, cluster, ciphertext):
    import httpx

    api = f"{two_replicas}/v2"
    s = httpx.post(f"{api}/sessions").json()
    sid = s["session_id"]
    key = load_session_key(cluster[1])
    forged = SessionTokens(b"x" * 32).issue(Claims(sid, "rlwe", "p128", 2_000_000_000))
    expired = SessionTokens(key).issue(Claims(sid, "rlwe", "p128", int(time.time()) - 1))

    def answers(token):
        """Status per replica, asking until both have answered."""
        got = {}
        for _ in range(40):
            r = httpx.post(f"{api}/sessions/{sid}/ops/{OP}/forward", params={"rows": 1, "cols": 32}, content=ciphertext,
                           headers={"authorization": f"Bearer {token}"})
            got.setdefault(r.headers[ray_serve.REPLICA_HEADER], set()).add(r.status_code)
            if len(got) == 2:
                return got
        raise AssertionError(f"only one replica answered: {got}")

    assert all(codes == {200} for codes in answers(s["token"]).values())
    assert all(codes == {401} for codes in answers(forged).values())
    assert all(codes == {404} for codes in answers(expired).values())
    assert httpx.delete(f"{api}/sessions/{sid}", headers={"authorization": f"Bearer {s['token']}"}).status_code == 204
    assert all(codes == {404} for codes in answers(s["token"]).values())


@pytest.mark.slow
def test_a_killed_replica_is_restarted_and_the_step_completes(cluster, micro_bundle, quantized, replicas_seen, monkeypatch):
    """The only replica, killed after a few ops of the step: the client's retries wait for Serve's restart."""
    import ray

    url = deploy(cluster, micro_bundle, "restart", replicas=1)
    killed = []
    original = WorkerClient.run

    def kill_once(self, *args, **kwargs):
        if not killed and len(replicas_seen) >= 6:  # info, codec, session and a few ops in
            ray.kill(ray.get_actor(f"SERVE_REPLICA::restart#WorkerIngress#{replicas_seen[-1]}", namespace="serve"),
                     no_restart=True)
            killed.append(replicas_seen[-1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WorkerClient, "run", kill_once)
    grads = lora_grads(build_private_model("micro-llama", "remote", workers=(url,)))
    assert killed and replicas_seen[-1] != killed[0]  # a new replica finished the step
    assert_equal_grads(grads, quantized)
    serve.delete("restart")


def test_a_layer_split_gives_the_same_step(cluster, micro_bundle, quantized, replicas_seen):
    """Blocks 0 and 1 on two deployments behind one router: the same bits as one deployment (= quantized)."""
    url = deploy(cluster, micro_bundle, "split", layer_ranges=((0, 1), (1, 2)))
    assert_equal_grads(lora_grads(build_private_model("micro-llama", "remote", workers=(url,))), quantized)
    serve.delete("split")


def test_two_replicas_share_the_owner_limits(cluster, micro_bundle, tmp_path, ciphertext):
    """On a real two-replica deployment: keyless requests get 401 from both replicas, the owner's session cap
    and request rate are the deployment's (per-replica counts would let through about twice the rate)."""
    import httpx

    from hetune.serving.admission import OwnerLimits, add_owner

    url, key_file = cluster
    keys_file = tmp_path / "keys.txt"
    key = add_owner(keys_file, "clinic")
    rpm = 20
    cfg = ServeConfig(api_keys=keys_file, owner_limits=OwnerLimits(sessions=1, requests_per_minute=rpm))
    rc = ray_serve.RayServeConfig(num_cpus=0.25, session_key_file=key_file, replicas=2)
    serve.run(ray_serve.build_app(micro_bundle, cfg, rc), name="admitted", route_prefix="/admitted")
    api, auth = f"{url}/admitted/v2", {"authorization": f"Bearer {key}"}
    try:
        keyless = [httpx.get(f"{api}/info") for _ in range(4)]
        while len({r.headers[ray_serve.REPLICA_HEADER] for r in keyless}) < 2 and len(keyless) < 60:  # routing is random
            keyless.append(httpx.post(f"{api}/sessions"))
        assert {r.status_code for r in keyless} == {401} and len({r.headers[ray_serve.REPLICA_HEADER] for r in keyless}) == 2
        assert httpx.get(f"{api}/live").json() == {"status": "ok"}
        s = httpx.post(f"{api}/sessions", headers=auth).json()  # the owner's request 1
        refused, used = set(), 1
        while len(refused) < 2 and used < 12:  # until both replicas have refused a second session
            r = httpx.post(f"{api}/sessions", headers=auth)
            used += 1
            assert r.status_code == 429 and "1 concurrent sessions" in r.json()["error"]
            refused.add(r.headers[ray_serve.REPLICA_HEADER])
        assert len(refused) == 2
        mine = {"authorization": f"Bearer {s['token']}"}
        burst = [httpx.post(f"{api}/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": 1, "cols": 32},
                            content=ciphertext, headers=mine) for _ in range(2 * rpm)]
        ok = sum(r.status_code == 200 for r in burst)
        limited = {r.headers[ray_serve.REPLICA_HEADER] for r in burst if r.status_code == 429}
        assert {r.status_code for r in burst} == {200, 429} and len(limited) == 2
        assert rpm - used <= ok <= rpm - used + 3, (ok, used)  # (+ what the bucket refills during the burst)
        with pytest.raises(ConfigError, match="TLS was asked for.*plain http.*cannot be applied"):
            ray_serve.check_endpoint(ray_serve._running_http_options(), ServeConfig(), require_tls=True)
    finally:
        serve.delete("admitted")



def test_header_fuzz_through_the_ray_ingress(cluster, micro_bundle, rlwe_keys, tmp_path):
    """Issue 20: the header fuzz of tests/test_worker_fuzz.py through Serve's proxy, to an app with API keys at
    route prefix "/" on two replicas: no 5xx, no session opened without a key, and a real product still answers."""
    import httpx
    from test_worker_fuzz import ROWS, fuzz_headers

    from hetune.serving.admission import add_owner

    url, key_file = cluster
    keys_file = tmp_path / "keys.txt"
    key = add_owner(keys_file, "clinic")
    cfg = ServeConfig(max_sessions=4, max_rows=8, api_keys=keys_file, body_timeout_s=1.0)
    rc = ray_serve.RayServeConfig(num_cpus=0.25, session_key_file=key_file, replicas=2)
    serve.run(ray_serve.build_app(micro_bundle, cfg, rc), name="fuzzed", route_prefix="/")
    auth = {"authorization": f"Bearer {key}"}
    try:
        s = httpx.post(f"{url}/v2/sessions", headers=auth).json()
        body = rlwe_keys.encrypt(np.random.default_rng(0).integers(0, 256, (ROWS, 32)))
        # Four kinds of answer, not the plain worker's five or more: Serve's proxy drops a half-closed link without an
        # answer (None) and signed sessions answer an unknown session's token 401, not 404 (seen: 400, 401, None, 200).
        fuzz_headers(int(url.rsplit(":", 1)[1]), s["session_id"], s["token"], body, examples=100, kinds=4)
        # "Still serving", not "at once": httpx's default 5 s ran out once on CI for this health request, a stall not
        # reproduced here (0.02-0.08 s in 7 runs, one beside a busy loop; after half-closed links the proxy dropped,
        # health answered in 0.06-0.1 s). A slow answer is reported as a warning; a hung replica still fails at 60 s.
        with httpx.Client(timeout=60) as client:
            t0 = time.monotonic()
            assert client.get(f"{url}/v2/health", headers=auth).json()["sessions"] <= 1  # the fuzz opened none (no key)
            if (waited := time.monotonic() - t0) > 5:
                warnings.warn(f"the Ray ingress answered health {waited:.1f} s after the header fuzz")
            again = client.post(f"{url}/v2/sessions", headers=auth).json()  # the owner still gets a session and a product
            r = client.post(f"{url}/v2/sessions/{again['session_id']}/ops/{OP}/forward", params={"rows": ROWS, "cols": 32},
                            content=body, headers={"authorization": f"Bearer {again['token']}"})
        assert r.status_code == 200
    finally:
        serve.delete("fuzzed")


def test_two_replicas_share_one_body_budget(cluster, micro_bundle):
    """Issue 20 on a real two-replica deployment: a held upload on one replica takes the deployment's body budget,
    so the other replica refuses a second one before reading it (each replica's own budget would have taken both),
    and takes it once the first is done."""
    import threading

    import httpx
    import ray

    url, key_file = cluster
    cfg = ServeConfig(body_budget_mib=1, owner_body_budget_mib=1)
    rc = ray_serve.RayServeConfig(num_cpus=0.25, session_key_file=key_file, replicas=2)  # one request at a time each
    serve.run(ray_serve.build_app(micro_bundle, cfg, rc), name="budget", route_prefix="/budget")
    api, rows = f"{url}/budget/v2", 4096
    body = generate_keys("rlwe").encrypt(np.zeros((rows, 32), dtype=np.int64))
    assert 2**20 / 2 < len(body) <= 2**20  # one fits the deployment's 1 MiB, two do not
    held_s, other = (httpx.post(f"{api}/sessions").json() for _ in range(2))

    def post(s, content, **headers):
        return httpx.post(f"{api}/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": rows, "cols": 32},
                          content=content, headers={"authorization": f"Bearer {s['token']}", **headers}, timeout=120)

    gate, held = threading.Event(), []

    def trickle():
        yield body[:1000]
        gate.wait(60)
        yield body[1000:]

    def ledger_full():
        """Whether the ledger has no room for another body (asked with a lease that ends at once)."""
        return ray.get(ray.get_actor("budget-ledger", namespace="hetune").reserve.remote(
            "probe", "probe", len(body), 2**20, 2**20, 0.0)) == "total"

    thread = threading.Thread(target=lambda: held.append(post(held_s, trickle(), **{"content-length": str(len(body))})))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not ledger_full() and time.monotonic() < deadline:  # until the held upload has its reservation
            time.sleep(0.2)
        refused = post(other, body)  # on the other replica: the held one serves one request at a time
        assert refused.status_code == 503 and "budget for request bodies in flight" in refused.json()["error"]
    finally:
        gate.set()
        thread.join(120)
    try:
        assert held[0].status_code == 200
        assert held[0].headers[ray_serve.REPLICA_HEADER] != refused.headers[ray_serve.REPLICA_HEADER]  # two replicas
        assert post(other, body).status_code == 200  # released: the budget takes it again
    finally:
        serve.delete("budget")


@pytest.mark.slow
def test_a_restarted_ledger_voids_earlier_sessions_and_the_client_reopens(cluster, micro_bundle, ciphertext):
    """The ledger actor killed and restarted by Ray: a token of the earlier ledger gets a 404 that says why, and the
    owner's client opens a new session and goes on (through the restarted ledger's first lease of 503s)."""
    import httpx
    import ray

    url, key_file = cluster
    rc = ray_serve.RayServeConfig(num_cpus=0.25, session_key_file=key_file)
    serve.run(ray_serve.build_app(micro_bundle, ServeConfig(), rc), name="relaunch", route_prefix="/relaunch")
    api = f"{url}/relaunch/v2"
    other = httpx.post(f"{api}/sessions").json()
    worker = WorkerClient(f"{url}/relaunch")
    worker.open(resolve_params("rlwe", None), b"")
    before = worker.session_id
    try:
        ray.kill(ray.get_actor("relaunch-ledger", namespace="hetune"), no_restart=False)
        for _ in range(40):  # until the call lands on the restarted ledger
            r = httpx.post(f"{api}/sessions/{other['session_id']}/ops/{OP}/forward", params={"rows": 1, "cols": 32},
                           content=ciphertext, headers={"authorization": f"Bearer {other['token']}"})
            if r.status_code == 404:
                break
            time.sleep(0.25)
        assert r.status_code == 404 and "ledger restarted" in r.json()["error"]
        assert worker.run(OP, "forward", ciphertext, 1, 32)[0] and worker.session_id != before  # reopened
        worker.close()
    finally:
        serve.delete("relaunch")
        ray.kill(ray.get_actor("relaunch-ledger", namespace="hetune"))
