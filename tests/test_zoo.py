"""Heads in every architecture of the zoo, with both exporters and transformers' default attention
(issue 9).

Each form (architecture x exporter with the default attention, and BERT after onnxruntime's
fusion with either attention) must be analysed into the expected attention units per layer
(grouped-query attention: one unit per KV head) and pruned with heads cut, the result verifying
against the masked dense graph with its dynamic axes intact. Forms that fail today carry a strict
xfail whose reason is the specific cause; the test first checks that this cause is still what
stops the form (a declined reason, a barrier of a head group that was not declined, or the
export error), so a fix that uncovers the next barrier fails loudly and the mark gets the new reason,
and a fix that makes the form pass fails the strict mark until it is removed.

Exports are made once per form, on first use (module fixture). TorchScript forms are fast (an
export under a second); dynamo exports take about 10 s each on 2 cores and are marked slow except
for two representatives, as is every prune but three.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest

from models import zoo
from tools.attention_pattern import analyse, fates
from tools.survey_attention import first_line


class HeadsMissing(AssertionError):
    """The form's heads were not all found or not pruned: what an xfail mark expects."""


Form = tuple[str, str, str]  # (arch, exporter, attention: "default" | "eager")

#: form -> the cause that stops it today, as a substring of a declined reason, of a barrier of
#: a head group that is not declined (listed as the model width, or nowhere), or of the export
#: error.
XFAIL: dict[Form, str] = {
}

#: Dynamo forms run by default (the rest are slow): one encoder, one decoder.
FAST_DYNAMO = {"bert", "llama"}
#: Forms whose prune runs by default: an encoder, a vision model, a decoder.
FAST_PRUNE = {("bert", "torchscript", "default"), ("vit", "torchscript", "default"),
              ("llama", "torchscript", "default")}

#: Every architecture with both exporters and its default attention, and BERT after
#: onnxruntime's fusion (default attention: SDPA, left unfused; eager: fused into Attention).
FORMS: list[Form] = [(arch, exporter, "default") for arch in zoo.ZOO
                     for exporter in zoo.EXPORTERS] + \
    [(arch, "ort-fused", attention) for arch in zoo.ORT_FUSED for attention in ("default", "eager")]


def params(fast: set[Form] | None) -> list:
    """FORMS as pytest params with their xfail and slow marks (``fast``: the forms not slow;
    None: the default, TorchScript and ort-fused plus FAST_DYNAMO)."""
    out = []
    for form in FORMS:
        marks = []
        if form in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, raises=HeadsMissing, reason=XFAIL[form]))
        is_fast = form in fast if fast is not None else \
            form[1] != "dynamo" or form[0] in FAST_DYNAMO
        if not is_fast:
            marks.append(pytest.mark.slow)
        form_id = "-".join(form[:2] if form[2] == "default" else form)
        out.append(pytest.param(form, marks=marks, id=form_id))
    return out


class Exports:
    """Each form exported on first use, once; an export error is kept as the form's result."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[Form, tuple[zoo.ZooModel, Path | None, str | None]] = {}

    def get(self, form: Form) -> tuple[zoo.ZooModel, Path | None, str | None]:
        if form not in self.done:
            arch, exporter, attention = form
            zm = zoo.ZOO[arch](attention)  # a fresh module per export (Swin mutates itself)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    path, error = zoo.export(zm, self.root / ("-".join(form) + ".onnx"),
                                             exporter), None
                except Exception as exc:  # noqa: BLE001 - a torch failure is the form's result
                    path, error = None, first_line(exc)
            self.done[form] = (zm, path, error)
        return self.done[form]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("zoo"))


def causes(path: Path, zm: zoo.ZooModel) -> tuple[object, list[str]]:
    """The structure of ``path`` (analysed as ``optin-onnx analyze`` does) and every reason that
    stops a group: declined reasons and the barriers of head groups that were not declined."""
    model, values, structure = analyse(path, zm.feeds(4))
    reasons = [r for d in structure.declined for r in d.reasons]
    reasons += [r for verdict, g in fates(model, values, structure)
                if verdict.startswith("DROPPED") for r in g.barriers]
    return structure, reasons


def expect_cause(form: Form, reasons: list[str]) -> None:
    """Where the form is marked, its recorded cause must still be among ``reasons``."""
    if form in XFAIL:
        assert any(XFAIL[form] in r for r in reasons), \
            f"the xfail reason {XFAIL[form]!r} no longer applies; now: {sorted(set(reasons))}"


def exported(exports: Exports, form: Form) -> tuple[zoo.ZooModel, Path]:
    """The form's model and file; an export failure is the form's missing heads."""
    zm, path, error = exports.get(form)
    if error is not None:
        expect_cause(form, [error])
        raise HeadsMissing(f"export fails: {error}")
    return zm, path


def with_heads(exports: Exports, form: Form) -> tuple[zoo.ZooModel, Path]:
    """The form's model and file once its attention units per layer are the expected ones;
    otherwise HeadsMissing, after checking that the recorded cause still applies."""
    zm, path = exported(exports, form)
    structure, reasons = causes(path, zm)
    expect_cause(form, reasons)
    heads = tuple(b.n_units for b in structure.blocks if b.kind == "attention")
    if heads != zm.units:
        raise HeadsMissing(f"attention units per layer {heads}, expected {zm.units}; "
                           f"stopped by: {sorted(set(reasons))}")
    return zm, path


@pytest.mark.parametrize("form", params(None))
def test_heads_are_found(exports, form):
    with_heads(exports, form)


def symbolic_axes(proto: onnx.ModelProto) -> list[tuple[str, list[tuple[int, str]]]]:
    """(input name, its symbolic axes with their names) for every graph input."""
    return [(vi.name, [(a, d.dim_param) for a, d in enumerate(vi.type.tensor_type.shape.dim)
                       if d.dim_param])
            for vi in proto.graph.input]


@pytest.mark.parametrize("form", params(FAST_PRUNE))
def test_prune_cuts_heads_and_verifies(exports, form):
    """Heads only, to a budget half a unit per layer below dense: the search must cut a head in
    some layer whatever the scores (at 0.7 with neurons too it may cut neurons only)."""
    from optin_onnx.analysis import pruned_feeds
    from optin_onnx.flops import mac_model
    from optin_onnx.pipeline import as_model, prune
    from optin_onnx.probe import sample_feeds, sequence_inputs
    from tests.helpers import run

    zm, path = with_heads(exports, form)
    feeds = zm.feeds(12)
    model, _, structure = analyse(path, feeds)
    macs = mac_model(model, structure, zoo.SEQ, like=feeds)
    unit = sum(macs.unit[b.name] for b in structure.blocks if b.kind == "attention")
    result = prune(path, feeds, flops=1 - 0.5 * unit / macs.total, prune="heads",
                   latency_cases=[], samples=8)
    assert result.verification.passed
    # Dynamic axes survive: the same inputs with the same symbolic axes, and the model output at
    # another batch and length (a KV cache shrinks with the heads kept, by design: the slim
    # model reads the kept part of it; output 0 only).
    dense = onnx.load(str(path))
    assert symbolic_axes(result.model) == symbolic_axes(dense)
    check = sample_feeds(zm.feeds(4), 3, 7, sequence_inputs(as_model(dense)))
    slim_check = pruned_feeds(check, result.structure.interface(result.selection.keep))
    assert run(result.model, slim_check)[0].shape == run(dense, check)[0].shape
    cut = sum(b.n_units - len(result.selection.keep[b.name])
              for b in result.structure.blocks if b.kind == "attention")
    assert cut > 0


def test_simplified_prune_keeps_axis_names(exports):
    """onnxsim renames some symbolic axes of the slim GPT-2 (``batch`` -> ``unk__0``); the
    simplify stage gives every graph input its declared names back."""
    from optin_onnx.pipeline import prune

    zm, path = with_heads(exports, ("gpt2", "torchscript", "default"))
    result = prune(path, zm.feeds(12), flops=0.7, latency_cases=[], samples=8, simplify="on")
    assert result.verification.passed
    assert symbolic_axes(result.model) == symbolic_axes(onnx.load(str(path)))
