"""Stage *score*: the fast trajectory scorer computes exactly what the naive reference computes
(one masked forward pass per unit), the scores behave like importances, and the sampled tokens
never land on padding."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from optin_onnx import graph, instrument
from optin_onnx.calibrate import make_calibration
from optin_onnx.pipeline import analyze
from optin_onnx.runtime import run_all_values
from optin_onnx.scoring.losses import TokenSample, md_loss, normalised_gram, rows
from optin_onnx.scoring.fast import score_rank_k
from optin_onnx.scoring.trajectory import ScoreConfig, fast_scorer, score_fast, score_naive
from tests.helpers import form_id, tiny_feeds

#: Both exporters, raw and onnxsim'd, with a logits head and with the token-output head (the
#: output term is then L_MD on the last hidden state instead of KL on logits).
SCORE_FORMS = [
    ("torchscript", "classifier", False),
    ("dynamo", "classifier", True),
    ("torchscript", "none", True),
    ("dynamo", "none", False),
]
TERMS = ("importance", "md", "kd")


def term_of(scores, term: str, block: str) -> np.ndarray:
    """One value per unit: ``kd`` has a column per objective output, and these models have one."""
    values = getattr(scores, term)[block]
    return values[:, 0] if term == "kd" else values
CFG = dict(tokens=40, candidates_per_run=3)  # 40 < the 55 real tokens: the sample is a subset


def calibration():
    """6 samples x 12 tokens, rows 1..5 padded, in chunks of 4: the second chunk (2 samples) is
    cut to its own longest row, so chunk boundaries and per-chunk lengths are both exercised."""
    cal = make_calibration(tiny_feeds(6, 12, seed=1), chunk_size=4)
    assert [(c.start, c.stop) for c in cal.chunks] == [(0, 4), (4, 6)]
    assert cal.chunks[1].seq_len < 12, "the second chunk should be cut to its real length"
    assert not cal.token_mask.all()
    return cal


_cache: dict = {}


def fast_and_naive(path, **cfg) -> tuple:
    """(model, structure, fast scores, naive scores) of a model file, computed once per run."""
    key = (str(path), tuple(sorted(cfg.items())))
    if key not in _cache:
        m, s = analyze(path)
        cal = calibration()
        config = ScoreConfig(**{**CFG, **cfg})
        _cache[key] = (m, s, score_fast(m, s, cal, config), score_naive(m, s, cal, config))
    return _cache[key]


@pytest.mark.parametrize("form", SCORE_FORMS, ids=form_id)
def test_fast_scorer_equals_naive_reference(tiny_exports, form):
    m, s, fast, naive = fast_and_naive(tiny_exports[form])
    assert [b.name for b in s.blocks] == ["layer0.attention", "layer0.mlp",
                                          "layer1.attention", "layer1.mlp"]
    for term in TERMS:
        assert set(getattr(fast, term)) == set(getattr(naive, term)) == {b.name for b in s.blocks}
        for b in s.blocks:
            f, n = term_of(fast, term, b.name), term_of(naive, term, b.name)
            assert f.shape == n.shape == (b.n_units,)
            scale = np.abs(n).max()
            assert scale > 0, f"{term} of {b.name} is all zero: nothing was measured"
            err = np.abs(f - n).max()
            assert err <= 1e-5 * scale, f"{term} of {b.name}: |fast - naive| = {err:.3g}, " \
                                        f"scale {scale:.3g}"
            half = b.n_units // 2
            np.testing.assert_array_equal(
                np.argsort(-f, kind="stable")[:half], np.argsort(-n, kind="stable")[:half],
                err_msg=f"top-{half} ranking of {term} in {b.name}")


def test_fast_equals_naive_with_neuron_groups(tiny_exports):
    """neuron_group > 1 (the one approximation on offer) is applied identically by both scorers:
    same groups, same shared-out per-neuron values."""
    _, s, fast, naive = fast_and_naive(tiny_exports[("dynamo", "classifier", True)], neuron_group=4)
    for term in TERMS:
        for b in s.blocks:
            f, n = term_of(fast, term, b.name), term_of(naive, term, b.name)
            assert f.shape == (b.n_units,) and np.all(np.isfinite(n))
            assert np.abs(f - n).max() <= 1e-5 * np.abs(n).max(), (term, b.name)
    exact = fast_and_naive(tiny_exports[("dynamo", "classifier", True)])[3]
    # Heads are never grouped; neurons are, so their scores change.
    assert not np.allclose(naive.md["layer0.mlp"], exact.md["layer0.mlp"], rtol=1e-3)
    np.testing.assert_allclose(naive.md["layer0.attention"], exact.md["layer0.attention"],
                               rtol=1e-5)


@pytest.mark.parametrize("form", SCORE_FORMS, ids=form_id)
def test_scores_are_non_negative_and_finalized(tiny_exports, form):
    _, s, fast, naive = fast_and_naive(tiny_exports[form])
    for scores in (fast, naive):
        for term in TERMS:
            for b in s.blocks:
                v = getattr(scores, term)[b.name]
                assert np.all(np.isfinite(v)) and np.all(v >= 0), (term, b.name)
        # importance = md / mean(md) + lam * kd / mean(kd), both means over every unit (one
        # objective output: kd has one column).
        md_mean = np.concatenate(list(scores.md.values())).mean()
        kd_mean = np.concatenate(list(scores.kd.values())).mean()
        for b in s.blocks:
            assert scores.kd[b.name].shape == (b.n_units, 1)
            np.testing.assert_allclose(scores.importance[b.name], scores.md[b.name] / md_mean
                                       + scores.kd[b.name][:, 0] / kd_mean, rtol=1e-12)


def _gram(token_rows: np.ndarray) -> np.ndarray:
    f = token_rows.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def _kl(t: np.ndarray, s: np.ndarray) -> float:
    lt = t.astype(np.float64) - np.log(np.exp(t.astype(np.float64)).sum(1, keepdims=True))
    ls = s.astype(np.float64) - np.log(np.exp(s.astype(np.float64)).sum(1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=1)))


@pytest.mark.parametrize("form", [("torchscript", "classifier", False), ("dynamo", "none", True)],
                         ids=form_id)
def test_raw_terms_match_the_definition_written_out(tiny_exports, form):
    """Both scorers share the loss plumbing (token gathering across cut chunks, Gram matrices),
    so check the naive scorer's raw terms against the definition computed here from scratch: one
    unchunked, uncut run of the masked model, the next layer's FFN output (the last layer's own
    for layer 1) at the sampled tokens, and KL on logits / L_MD on the token output."""
    m, s, _, naive = fast_and_naive(tiny_exports[form])
    feeds = tiny_feeds(6, 12, seed=1)
    tokens = TokenSample.draw(feeds["attention_mask"].astype(bool), CFG["tokens"], 0)
    out_name = m.graph.outputs[0].name
    mlp = {b.layer: b.feature for b in s.blocks if b.kind == "mlp"}

    def values(model) -> dict[str, np.ndarray]:
        return run_all_values(ir.to_proto(model), feeds, names=[*mlp.values(), out_name])

    def at_tokens(a: np.ndarray) -> np.ndarray:  # [6, 12, H] or the Gemm form's [72, H]
        return a.reshape(6, 12, -1)[tokens.sample, tokens.position]

    dense = values(m)
    checked = 0
    for b in s.blocks:
        units = range(b.n_units) if b.kind == "attention" else \
            np.argsort(-naive.md[b.name])[:2]  # the clearest neurons, well above float noise
        feature = mlp[min(b.layer + 1, s.n_layers - 1)]
        for u in units:
            mask = np.ones(b.n_units, np.float32)
            mask[u] = 0
            student = values(instrument.masked_model(m, s, {b.name: mask}))
            md = np.sum((_gram(at_tokens(student[feature]))
                         - _gram(at_tokens(dense[feature]))) ** 2)
            if form[1] == "none":
                kd = np.sum((_gram(at_tokens(student[out_name]))
                             - _gram(at_tokens(dense[out_name]))) ** 2)
            else:
                kd = _kl(dense[out_name], student[out_name])
            assert naive.md[b.name][u] == pytest.approx(md, rel=1e-3), (b.name, u)
            assert naive.kd[b.name][u, 0] == pytest.approx(kd, rel=1e-3), (b.name, u)
            checked += 1
    assert checked == 4 + 2 + 4 + 2


def test_heads_and_neurons_get_the_rank_k_scorer(tiny_exports):
    _, s = analyze(tiny_exports[SCORE_FORMS[0]])
    assert fast_scorer(s) is score_rank_k


def test_finalize_returns_new_scores_and_leaves_these_alone(tiny_exports):
    """One scoring serves several lambdas (the accuracy benchmark): finalizing at another
    lambda must not change the scores it started from."""
    fast = fast_and_naive(tiny_exports[SCORE_FORMS[0]])[2]
    before = {k: v.copy() for k, v in fast.importance.items()}
    heavy = fast.finalize(5.0)
    assert heavy is not fast
    for k, v in before.items():
        np.testing.assert_array_equal(fast.importance[k], v)
    assert any(not np.allclose(heavy.importance[k], v) for k, v in before.items())


def test_lambda_weighs_the_output_term(tiny_exports):
    m, s = analyze(tiny_exports[("torchscript", "classifier", False)])
    cal = calibration()
    base = fast_and_naive(tiny_exports[("torchscript", "classifier", False)])[2]
    heavy = score_fast(m, s, cal, ScoreConfig(**CFG, lam=5.0))
    md_mean = np.concatenate(list(base.md.values())).mean()
    kd_mean = np.concatenate(list(base.kd.values())).mean()
    for b in s.blocks:
        np.testing.assert_allclose(heavy.md[b.name], base.md[b.name], rtol=1e-9)
        np.testing.assert_allclose(heavy.importance[b.name], base.md[b.name] / md_mean
                                   + 5.0 * base.kd[b.name][:, 0] / kd_mean, rtol=1e-6)


@pytest.mark.parametrize("form", [("torchscript", "classifier", False), ("dynamo", "none", True)],
                         ids=form_id)
def test_a_neuron_with_zero_output_weights_scores_zero(tiny_exports, form, tmp_path):
    """Zero one FFN neuron's row of W2 (its consumer weight): masking it then changes nothing, so
    both scorers must give it ~0 importance while its neighbours stay clearly positive."""
    m, s = analyze(tiny_exports[form])
    block = next(b for b in s.blocks if b.name == "layer0.mlp")
    c = block.consumers[0]
    weight = graph.nodes_by_name(m.graph)[c.node].inputs[c.weight_index]
    unit = 17

    proto = onnx.load(str(tiny_exports[form]))
    init = next(t for t in proto.graph.initializer if t.name == weight.name)
    w = numpy_helper.to_array(init).copy()
    assert w.shape[c.weight_axis] == block.n_units
    index = [slice(None)] * w.ndim
    index[c.weight_axis] = unit
    assert np.abs(w[tuple(index)]).max() > 0
    w[tuple(index)] = 0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path = tmp_path / "zeroed.onnx"
    onnx.save(proto, str(path))

    _, s2, fast, naive = fast_and_naive(path)
    assert [b.name for b in s2.blocks] == [b.name for b in s.blocks]
    for scores in (fast, naive):
        imp = scores.importance["layer0.mlp"]
        top = max(v.max() for v in scores.importance.values())
        assert imp[unit] < 1e-6 * top, f"zeroed neuron scored {imp[unit]:.3g} (max {top:.3g})"
        assert scores.md["layer0.mlp"][unit] < 1e-6 * scores.md["layer0.mlp"].max()
        assert scores.kd["layer0.mlp"][unit, 0] < 1e-6 * scores.kd["layer0.mlp"].max()
        others = np.delete(imp, unit)
        assert others.min() > 100 * max(imp[unit], 1e-30), "the other neurons should matter"


def test_local_ablation_differs_from_trajectory(tiny_exports):
    """features='local' measures only the unit's own layer: layer 0 units lose the downstream
    trajectory (different MD term), the last layer is measured on the same feature either way,
    and the output term does not depend on the features at all."""
    path = tiny_exports[("torchscript", "classifier", False)]
    _, s, traj, _ = fast_and_naive(path)
    m, s = analyze(path)
    local = score_fast(m, s, calibration(), ScoreConfig(**CFG, features="local"))
    for b in s.blocks:
        np.testing.assert_allclose(local.kd[b.name], traj.kd[b.name], rtol=1e-5)
        if b.layer == s.n_layers - 1:
            np.testing.assert_allclose(local.md[b.name], traj.md[b.name], rtol=1e-5)
        else:
            rel = np.abs(local.md[b.name] - traj.md[b.name]).max() / traj.md[b.name].max()
            assert rel > 0.05, f"{b.name}: local MD equals trajectory MD ({rel:.3g})"
    changed = [b.name for b in s.blocks
               if not np.allclose(local.importance[b.name], traj.importance[b.name], rtol=1e-3)]
    assert "layer0.mlp" in changed and "layer0.attention" in changed
    # And the ablation changes which neurons look least important in layer 0.
    order = lambda sc: np.argsort(sc.importance["layer0.mlp"], kind="stable")[:12].tolist()
    assert order(local) != order(traj)


# -- L_MD ----------------------------------------------------------------------------------------

def _gram64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-5])
def test_md_loss_matches_the_float64_definition_down_to_small_changes(eps):
    """The loss is taken in float32 (the Gram products and their difference) and summed in
    float64: from a large change down to one near float32's resolution of cosines, it stays the
    float64 definition's value to within that resolution (K^2 entries, each off by ~1e-7)."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((300, 64)).astype(np.float32)
    student = teacher + eps * rng.standard_normal(teacher.shape).astype(np.float32)
    exact = float(np.sum((_gram64(student) - _gram64(teacher)) ** 2))
    got = md_loss(normalised_gram(teacher), student)
    assert got == pytest.approx(exact, rel=1e-3, abs=300 ** 2 * 1e-13)
    assert md_loss(normalised_gram(teacher), teacher) == 0.0
    assert normalised_gram(teacher).dtype == np.float32


# -- token sample ------------------------------------------------------------------------------

def random_mask(seed: int, n: int = 7, s: int = 13) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, s + 1, size=n)
    return np.arange(s)[None, :] < lengths[:, None]


@pytest.mark.parametrize("seed", range(5))
def test_token_sample_never_picks_padding(seed):
    mask = random_mask(seed)
    k = int(mask.sum()) // 2
    t = TokenSample.draw(mask, k, seed)
    assert t.sample.shape == t.position.shape == (k,)
    assert mask[t.sample, t.position].all(), "a padding position was sampled"
    flat = t.sample * mask.shape[1] + t.position
    assert len(set(flat.tolist())) == k, "a token was sampled twice"
    assert np.all(np.diff(flat) > 0), "tokens are kept in calibration order"


def test_token_sample_takes_every_real_token_when_k_is_large():
    mask = random_mask(3)
    t = TokenSample.draw(mask, int(mask.sum()) + 10, seed=0)
    assert len(t.sample) == mask.sum()
    got = np.zeros_like(mask)
    got[t.sample, t.position] = True
    np.testing.assert_array_equal(got, mask)


def test_token_sample_is_deterministic_for_a_seed():
    mask = random_mask(4, n=20, s=30)
    k = 50
    a, b = TokenSample.draw(mask, k, 123), TokenSample.draw(mask, k, 123)
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.position, b.position)
    c = TokenSample.draw(mask, k, 124)
    assert not (np.array_equal(a.sample, c.sample) and np.array_equal(a.position, c.position))


def test_token_sample_rows_in_chunk_address_the_chunk_map():
    """Chunks cut to their own length: the row index must point at the same (sample, position)
    in the flattened [samples, seq, features] map of that chunk."""
    mask = random_mask(5, n=10, s=9)
    t = TokenSample.draw(mask, 25, 0)
    seen = 0
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        seq = int(np.nonzero(mask[start:stop].any(0))[0].max()) + 1
        sample, position = np.meshgrid(np.arange(start, stop), np.arange(seq), indexing="ij")
        feature = np.stack([sample, position], axis=-1)  # [n, seq, 2]
        sel, idx = t.rows_in_chunk(start, stop, seq)
        got = rows(feature)[idx]
        np.testing.assert_array_equal(got[:, 0], t.sample[sel])
        np.testing.assert_array_equal(got[:, 1], t.position[sel])
        seen += len(sel)
    assert seen == 25
