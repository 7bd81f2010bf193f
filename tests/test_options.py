"""PruneOptions: frozen, checked when made, and the one source of ``optin-onnx prune``'s flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest

from optin_onnx.cli import _parser
from optin_onnx.errors import OptinError
from optin_onnx.options import FeatureKind, Method, PruneOptions, choices, from_args, specs
from optin_onnx.scoring.features import FEATURE_KINDS
from optin_onnx.scoring.importance import IMPORTANCES


def parse(*flags: str) -> PruneOptions:
    return from_args(_parser().parse_args(["prune", "in.onnx", "out.onnx", "--calib", "c.npz",
                                           *flags]))


def test_options_are_frozen_and_replace_checks_again():
    options = PruneOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.flops = 0.5  # type: ignore[misc]
    assert dataclasses.replace(options, flops=0.5).flops == 0.5
    with pytest.raises(OptinError, match="--simplify must be one of auto, on, off"):
        dataclasses.replace(options, simplify="sometimes")


def test_choices_agree_with_the_scorers():
    assert get_args(Method) == tuple(IMPORTANCES) == choices()["method"]
    assert get_args(FeatureKind) == FEATURE_KINDS


def test_every_flagged_option_parses_to_its_default():
    assert parse() == PruneOptions()
    flags = {spec.flag for spec, _ in specs().values() if spec.cli}
    help_text = _parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert all(flag in help_text for flag in flags)


def test_the_readme_documents_every_flag():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [spec.flag for spec, _ in specs().values()
               if spec.cli and f"`{spec.flag}" not in readme]
    assert not missing


@pytest.mark.parametrize("new, old, field, value", [
    ("--ffn-multiple", "--round", "width_multiple", 4),
    ("--rounds", "--steps", "steps", 3),
])
def test_renamed_flags_keep_the_old_spelling_out_of_help(new, old, field, value):
    assert getattr(parse(new, str(value)), field) == value
    assert getattr(parse(old, str(value)), field) == value
    help_text = _parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert new in help_text and f"{old} " not in help_text


def test_flags_convert_to_the_fields():
    got = parse("--max-calib-gib", "1", "--latency", "2x8", "--no-canonicalize", "--reconstruct")
    assert got.max_calib_bytes == 2**30 and got.latency_cases == ((2, 8),)
    assert got.canonicalize is False and got.reconstruct == "refit"
