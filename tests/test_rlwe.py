"""The batched RLWE scheme: exact kernels, exact decryption, noise headroom, randomness, wire checks.

Everything here runs in seconds: the scheme's products are integer GEMMs.
"""

import math
import secrets

import numpy as np
import pytest
import torch

from hetune.crypto import randomness, rlwe, rlwe_wire
from hetune.crypto.keys import generate_keys, load_keys
from hetune.crypto.ring import (BinaryPolyMultiplier, gemm_mod_2_64, limb_plan, small_product_bits,
                                small_product_error, split_signed)
from hetune.crypto.rlwe_params import PARAM_SETS, WORST_WEIGHT_L2, wire_bits
from hetune.crypto.scheme import PayloadError
from hetune.crypto.registry import get_scheme

SCHEME = rlwe.SCHEME


def random_words(*shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(secrets.token_bytes(8 * math.prod(shape))), dtype=torch.int64).view(*shape)


def as_u64(t: torch.Tensor) -> list[int]:
    return [int(v) % 2**64 for v in t.flatten()]


def negacyclic_mul_reference(a: list[int], s: list[int]) -> list[int]:
    """Schoolbook negacyclic product a * s mod (X^N + 1, 2^64) in Python integers: the oracle."""
    n = len(a)
    out = [0] * n
    for i, ai in enumerate(a):
        for j, sj in enumerate(s):
            if sj:
                k = i + j
                if k < n:
                    out[k] += ai * sj
                else:
                    out[k - n] -= ai * sj
    return [v % 2**64 for v in out]


@pytest.fixture(scope="module")
def keys():
    return generate_keys("rlwe")


def roundtrip(keys, x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    params = keys.params
    body = keys.encrypt(x)
    SCHEME.check_request(params, body, *x.shape)
    return keys.decrypt(SCHEME.multiply(params, None, body, w), x.shape[0], w.shape[0])


def exact(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    return (x.to(torch.float64) @ w.T.to(torch.float64)).to(torch.int64).numpy()


@pytest.mark.parametrize("n", [4, 16, 256, 2048])
def test_negacyclic_product_equals_schoolbook(n):
    s = randomness.binary_secret(n)
    a = random_words(3, n)
    got = BinaryPolyMultiplier(s).mul(a)
    for row in range(3 if n <= 256 else 1):
        assert as_u64(got[row]) == negacyclic_mul_reference(as_u64(a[row]), s.tolist())


@pytest.mark.parametrize("n", [2048, 4096])
def test_negacyclic_product_is_exact_at_the_largest_limbs(n):
    """The limbs' signs and recombination at their largest magnitudes: the heaviest secret (all ones) against words
    whose unsigned low limb is 2^32 - 1 and high limb at either extreme (exactness itself rests on Percival's bound,
    checked by the constructor, which refuses a degree where it reaches 1/2). With s = 1...1 the product is
    (a s)_k = sum_{j<=k} a_j - sum_{j>k} a_j (mod X^N + 1)."""
    s = torch.ones(n, dtype=torch.int64)
    a = random_words(4, n)
    a[0] = -1  # every word 0xffff_ffff_ffff_ffff: both limbs at their largest magnitude, one sign
    a[1] = (1 << 63) - 1 - (1 << 31)  # low limb 0x7fff_ffff, high 0x7fff_ffff
    a[2, ::2], a[2, 1::2] = (1 << 32) - 1, -(1 << 63)  # alternating signs of the high limb
    got = BinaryPolyMultiplier(s).mul(a)
    for row in range(4):
        words = as_u64(a[row])
        total, prefix, ref = sum(words), 0, []
        for w in words:
            prefix += w
            ref.append((prefix - (total - prefix)) % 2**64)
        assert as_u64(got[row]) == ref


def test_a_degree_beyond_the_exact_bound_is_refused():
    with pytest.raises(ValueError, match="not provably exact"):
        BinaryPolyMultiplier(torch.ones(8192, dtype=torch.int64))


@pytest.mark.parametrize("n", [16, 2048, 4096])
@pytest.mark.parametrize("narrower", [0, 2])  # the widest operand (rounded by torch), and the hint's 40 bits (the rounder)
def test_one_fft_product_stays_within_its_bound(n, narrower):
    """mul_top at its widest operand and 2 bits under, worst-case signs (v = 2^(k-1) - 1 and -2^(k-1), s all ones
    in some rows)."""
    k = small_product_bits(n) - narrower
    z = 64 - k
    s = randomness.binary_secret(n)
    s[: n // 2] = 1  # a heavy secret: ||s||_1 >= N/2
    v = random_words(4, n) >> (65 - k)  # |v| < 2^(k-2), random signs
    v[0] = (1 << (k - 1)) - 1  # all at the largest magnitude, one sign (2^(k-1) itself would wrap to -2^(k-1))
    v[1] = -(1 << (k - 1))
    got = BinaryPolyMultiplier(s).mul_top(v << z, k)
    bound = small_product_error(n, k)
    for row in range(4 if n <= 2048 else 2):
        ref = negacyclic_mul_reference([int(x) for x in v[row]], s.tolist())
        exact_row = [x - 2**64 if x >= 2**63 else x for x in ref]  # |v s| < 2^52: no wrap, signed
        errors = [(int(g) - (e << z) + 2**63) % 2**64 - 2**63 for g, e in zip(got[row], exact_row)]  # mod 2^64, centred
        assert max(abs(d) for d in errors) <= bound * 2.0**z
        assert all(d % 2**z == 0 for d in errors)  # the low bits stay zero: the value is shifted back up
    assert bound * 2.0**z < 2**30  # ~2^28 in the phase: far below Delta / 2


def test_gemm_mod_2_64_equals_python_integers():
    for n_in, value_bits, wmax in [(7, 64, 127), (300, 64, 127), (64, 48, 2047), (33, 64, 1)]:
        w = torch.randint(-wmax, wmax + 1, (5, n_in))
        x = random_words(n_in, 6) if value_bits == 64 else random_words(n_in, 6) >> (64 - value_bits)
        got = gemm_mod_2_64(w, x, value_bits)
        for o in range(5):
            for c in range(6):
                ref = sum(int(w[o, j]) * int(x[j, c]) for j in range(n_in)) % 2**64
                assert int(got[o, c]) % 2**64 == ref


def test_limbs_recombine_and_stay_inside_float64():
    x = random_words(1000)
    for bits, n in [(32, 2), (22, 3), (16, 4)]:
        limbs = split_signed(x, bits, n)
        assert all(int(limb.abs().max()) <= 2 ** (bits - 1) for limb in limbs)
        back = sum(limb * (1 << (bits * k)) for k, limb in enumerate(limbs))  # wraps mod 2^64
        assert torch.equal(back, x)
    limb_bits, n_limbs = limb_plan(64, 16384, 127)
    assert n_limbs * limb_bits >= 64 and 16384 * 127 * 2 ** (limb_bits - 1) < 2**53


@pytest.mark.parametrize("rows", [1, 5, 2048, 2100, 4097])  # T < N, T = N, T > N (several blocks)
@pytest.mark.parametrize("signed", [False, True])
def test_decryption_is_exact(keys, rows, signed):
    gen = torch.Generator().manual_seed(rows)
    lo, hi = (-127, 128) if signed else (0, 256)
    x = torch.randint(lo, hi, (rows, 24), generator=gen)
    w = torch.randint(-127, 128, (40, 24), generator=gen)
    assert np.array_equal(roundtrip(keys, x, w), exact(x, w))


@pytest.mark.parametrize("name", ["p192", "p256"])
def test_larger_ring_sets_are_exact(name):
    keys = generate_keys("rlwe", name)
    assert keys.params.poly_size == 4096 and keys.params.security.bits == int(name[1:])
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randint(0, 256, (4100, 16), generator=gen), torch.randint(-127, 128, (8, 16), generator=gen)
    assert np.array_equal(roundtrip(keys, x, w), exact(x, w))


def test_results_at_the_edge_of_the_budget_decode_and_beyond_it_wrap(keys):
    half = 2 ** (keys.params.budget_bits - 1)  # results in [-half, half) decode
    x = torch.full((1, 4), half // 4, dtype=torch.int64)
    w = torch.tensor([[-1, -1, -1, -1], [1, 1, 1, 0], [1, 1, 1, 1]])
    got = roundtrip(keys, x, w)[0]
    assert got[0] == -half and got[1] == 3 * half // 4  # inside the budget: exact
    assert got[2] == -half  # +half is one past the range: it wraps


def worst_case_noise_check(keys, n_values: int):
    """|w| = 127 everywhere at the widest unfused input: the largest noise the analysis allows."""
    params, n_in = keys.params, 8192
    sign = torch.randint(0, 2, (n_values // 2048, n_in)) * 2 - 1
    w = sign * 127  # (n_out, n_in): every row has L2 norm 127 sqrt(8192)
    assert float(w.double().norm(dim=1).max()) == pytest.approx(WORST_WEIGHT_L2) and WORST_WEIGHT_L2 <= params.max_weight_l2
    x = torch.randint(-1, 2, (2048, n_in))  # results stay far inside the budget: only the noise is worst-case
    got = roundtrip(keys, x, w)
    assert got.size >= n_values
    assert np.array_equal(got, exact(x, w))


@pytest.mark.parametrize("full_width", [False, True])
def test_worst_case_weights_decode_exactly_over_a_million_values(keys, monkeypatch, full_width):
    """At the worker's chosen width, and with unrounded 64-bit results (decryption trims the mask result to fft_bits)."""
    if full_width:
        monkeypatch.setattr(type(keys.rp), "output_bits", lambda self, weight_l2: 64)
    worst_case_noise_check(keys, 2**20)


@pytest.mark.slow
def test_worst_case_weights_decode_exactly_over_ten_million_values(keys):
    for _ in range(5):
        worst_case_noise_check(keys, 2**21)


def test_output_width_follows_the_weight_norm():
    rp = PARAM_SETS["p128"]
    assert rp.log2_delta == 35 and rp.budget_bits == 29  # TUniform(17): see rlwe_params
    assert rp.output_bits(WORST_WEIGHT_L2) < rp.output_bits(rp.max_weight_l2 * 0.999) <= 64
    with pytest.raises(ValueError, match="exceeds"):
        rp.output_bits(rp.max_weight_l2 * 1.01)
    # with fixed masks the per-call body result needs the budget and a few bits only: 33-34 at p128
    assert [rp.hinted_bits(l2) for l2 in (300, 3000, WORST_WEIGHT_L2)] == [(40, 33), (40, 33), (40, 34)]
    assert [wire_bits(b) for b in (33, 36, 37, 39, 40)] == [33, 36, 40, 40, 40]  # sub-byte only where it saves 4+ bits


def test_ciphertexts_look_random_and_carry_no_plaintext_or_key(keys):
    x = torch.randint(0, 256, (64, 32))
    first, second = keys.encrypt(x), keys.encrypt(x)
    h1 = rlwe_wire.Header.parse(first, rlwe_wire.REQUEST, "rlwe", "p128")
    h2 = rlwe_wire.Header.parse(second, rlwe_wire.REQUEST, "rlwe", "p128")
    assert h1.seed != h2.seed  # a fresh mask seed per request
    body1, body2 = first[rlwe_wire.HEADER_BYTES :], second[rlwe_wire.HEADER_BYTES :]
    assert body1 != body2
    same = np.frombuffer(body1, np.uint8) == np.frombuffer(body2, np.uint8)
    assert same.mean() < 0.01  # bytes agree by chance only (~1/256)
    secret = np.packbits(keys._secret.numpy().astype(np.uint8)).tobytes()
    for body in (first, second):
        for i in range(0, len(secret) - 16, 16):
            assert secret[i : i + 16] not in body
        for row in x:
            for dtype in (np.uint8, np.int16, np.int32, np.int64):
                assert row.numpy().astype(dtype).tobytes() not in body
    assert abs(float(np.frombuffer(body1, np.uint8).mean()) - 127.5) < 2  # bytes spread over 0..255


def test_wrong_key_decrypts_to_garbage(keys):
    x, w = torch.randint(0, 256, (16, 8)), torch.randint(-127, 128, (4, 8))
    result = SCHEME.multiply(keys.params, None, keys.encrypt(x), w)
    other = generate_keys("rlwe")
    wrong = other.decrypt(result, 16, 4)
    assert (wrong != exact(x, w)).mean() > 0.99


def test_secret_key_file_is_0600_and_loads_back(keys, tmp_path):
    import stat

    path = tmp_path / "rlwe.key"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_keys(path, "rlwe")
    x, w = torch.randint(0, 256, (8, 8)), torch.randint(-127, 128, (4, 8))
    assert np.array_equal(again.decrypt(SCHEME.multiply(keys.params, None, keys.encrypt(x), w), 8, 4), exact(x, w))
    (tmp_path / "bad.key").write_bytes(b"not a key")
    with pytest.raises(Exception, match="not a hetune RLWE secret key"):
        load_keys(tmp_path / "bad.key", "rlwe")


@pytest.mark.parametrize(
    "damage,status,message",
    [
        ("truncated", 422, "truncated"),
        ("extended", 422, "bytes"),
        ("magic", 400, "not a batched-RLWE request"),
        ("version", 400, "version"),
        ("set", 422, "rlwe/p192, this session uses rlwe/p128"),
        ("scheme", 422, "glwe/p128, this session uses rlwe/p128"),
        ("rows", 422, "header says"),
        ("value_bits", 400, "carry 48-bit values"),
        ("empty", 400, "not a batched-RLWE request"),
    ],
)
def test_malformed_requests_are_refused_before_any_work(keys, damage, status, message):
    body = bytearray(keys.encrypt(torch.randint(0, 256, (3, 8))))
    if damage == "truncated":
        body = body[:-5]
    elif damage == "extended":
        body += b"\0" * 6
    elif damage == "magic":
        body[:4] = b"XXXX"
    elif damage == "version":
        body[4] = 9
    elif damage == "set":
        body[14:22] = b"p192".ljust(8, b"\0")
    elif damage == "scheme":
        body[6:14] = b"glwe".ljust(8, b"\0")
    elif damage == "rows":
        body[22:26] = (4).to_bytes(4, "little")
    elif damage == "value_bits":
        body[30] = 40
    elif damage == "empty":
        body = b""
    with pytest.raises(PayloadError, match=message) as info:
        SCHEME.check_request(keys.params, bytes(body), 3, 8)
    assert info.value.status == status


def test_registry_names_both_schemes_and_refuses_unknown_ones():
    from hetune.errors import ConfigError

    assert get_scheme().name == "rlwe" and get_scheme("glwe").name == "glwe"
    with pytest.raises(ConfigError, match="choose one of glwe, rlwe|choose one of rlwe, glwe"):
        get_scheme("ckks")
    with pytest.raises(ConfigError, match="not allow-listed for scheme 'rlwe'"):
        SCHEME.params("p80")


def test_register_keys_routes_a_scheme_to_its_key_module(monkeypatch, tmp_path):
    from hetune.crypto import keys as key_modules
    from hetune.errors import ConfigError

    monkeypatch.setitem(key_modules._KEYS, "rlwe", key_modules._KEYS["rlwe"])  # restored after the test
    made, loaded = [], []
    key_modules.register_keys("rlwe", made.append, loaded.append)
    key_modules.generate_keys("rlwe")
    key_modules.load_keys(tmp_path / "k", "rlwe")
    assert made == [SCHEME.default_param_set] and loaded == [tmp_path / "k"]
    with pytest.raises(ConfigError, match="unknown"):  # keys belong to a registered scheme
        key_modules.register_keys("ckks", made.append, loaded.append)


def test_noise_comes_from_the_os_csprng_not_torch():
    torch.manual_seed(0)
    a = randomness.t_uniform(1000, 17)
    torch.manual_seed(0)
    b = randomness.t_uniform(1000, 17)
    assert not torch.equal(a, b)  # seeding torch does not reproduce it


def test_t_uniform_has_tfhe_rs_distribution():
    """TUniform(b): every value of [-2^b, 2^b] with weight 2^-(b+1), the two ends 2^-(b+2)."""
    b, count = 3, 2**20
    e = randomness.t_uniform(count, b)
    freq = torch.bincount(e + 2**b, minlength=2 ** (b + 1) + 1).double() / count
    expected = torch.full((2 ** (b + 1) + 1,), 2.0 ** -(b + 1), dtype=torch.float64)
    expected[0] = expected[-1] = 2.0 ** -(b + 2)
    assert torch.allclose(freq, expected, atol=5 * math.sqrt(2.0 ** -(b + 1) / count))  # 5 sigma of a bin count
    assert int(e.min()) == -(2**b) and int(e.max()) == 2**b
    big = randomness.t_uniform(count, 17).double()
    assert abs(float(big.var()) / PARAM_SETS["p128"].noise_variance - 1) < 0.01  # (2^35 + 1) / 6
    assert abs(float(big.mean())) < 5 * PARAM_SETS["p128"].noise_std / math.sqrt(count)


def test_keystream_is_aes_ctr_of_zeros():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = randomness.new_seed()
    for count in (1, 3, 200_000):  # several shared-zero chunks for the largest
        ref = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * count))
        assert randomness.aes_ctr_words(seed, count).numpy().tobytes() == ref


def test_values_round_trip_the_wire_at_every_width_in_bits():
    """Top-k-bit rounding, packed in units of 256 (top bytes, then bit planes), unpacks to the same rounded values."""
    from hetune.crypto import rlwe_wire as wire

    x = torch.from_numpy(np.random.default_rng(5).integers(-(2**63), 2**63 - 1, size=3 * 256, dtype=np.int64))
    x[:4] = torch.tensor([-(2**63), 2**63 - 1, 0, -1])
    for bits in range(1, 65):
        data = wire.pack_top(x, bits)
        assert len(data) == wire.packed_bytes(x.numel(), bits) == x.numel() * bits // 8
        drop = np.uint64(64 - bits)
        rounded = x.numpy().view(np.uint64) + (np.uint64(1) << drop >> np.uint64(1)) if bits < 64 else x.numpy().view(np.uint64)
        expected = (rounded >> drop << drop).view(np.int64) if bits < 64 else x.numpy()
        assert np.array_equal(wire.unpack_top(data, x.numel(), bits).numpy(), expected), bits
    with pytest.raises(PayloadError, match="whole units"):
        wire.unpack_top(wire.pack_top(x, 33), 100, 33)


def _reference_pack(values: list[int], bits: int) -> bytes:
    """The module docstring's layout, value by value in plain integers: an independent reading of the spec."""
    drop, (whole, e) = 64 - bits, divmod(bits, 8)
    out = bytearray()
    for start in range(0, len(values), 256):
        rounded = [((v % 2**64) + (1 << drop >> 1)) % 2**64 for v in values[start : start + 256]]
        for r in rounded:  # the top ``whole`` bytes, little-endian
            out += (r >> (64 - 8 * whole)).to_bytes(whole, "little") if whole else b""
        rest = [(r >> (64 - 8 * whole - e)) & ((1 << e) - 1) for r in rounded]
        for j in range(e):  # plane j: bit j of value i at bit i
            out += sum(((x >> j) & 1) << i for i, x in enumerate(rest)).to_bytes(32, "little")
    return bytes(out)


def test_wire_bytes_follow_the_documented_layout_exactly():
    """Golden bytes: the packing equals the docstring's layout computed by hand, and the header's bytes are pinned.

    The round-trip test above would pass for any self-consistent layout; this one fails if the
    bytes a peer sees change, which would break an older worker or owner without a version bump.
    """
    from hetune.crypto import rlwe_wire as wire

    rng = np.random.default_rng(11)
    values = [int(v) for v in rng.integers(-(2**63), 2**63 - 1, size=2 * 256, dtype=np.int64)]
    values[:3] = [-(2**63), 2**63 - 1, -1]
    x = torch.tensor(values, dtype=torch.int64)
    for bits in (1, 5, 8, 13, 24, 30, 33, 39, 40, 57, 63):
        assert wire.pack_top(x, bits) == _reference_pack(values, bits), bits
    assert wire.pack_top(x, 64) == b"".join(v.to_bytes(8, "little", signed=True) for v in values)
    header = wire.Header(wire.HINTED_REQUEST, "rlwe", "p128", 2048, 576, 33, bytes(range(16))).pack()
    assert header.hex() == ("4854524c" "04" "03" "726c776500000000" "7031323800000000" "00080000" "40020000" "21"
                            "000102030405060708090a0b0c0d0e0f")
    assert wire.pack_trailer(1.5) == b"HTWS" + bytes.fromhex("000000000000f83f")  # float64 1.5, little-endian
