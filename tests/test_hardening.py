"""Hostile and careless input (issue 10): each case is built here, small, and must end in one
``optin-onnx: error:`` line with exit status 2, the inputs byte-identical and nothing left behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optin_onnx import io
from optin_onnx.errors import OptinError
from tests.test_cli import call, check_one_error_line

#: The bytes planted outside the model's folder; they must never be read.
SECRET = b"TOP-SECRET" * 205
WEIGHT_BYTES = 16 * 32 * 4


def external_model(path: Path, location: str) -> Path:
    """x @ W with W's 16x32 float32 data declared to live at ``location`` (nothing is written
    there: each test puts there what it wants the tool to find)."""
    w = numpy_helper.from_array(np.zeros((16, 32), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT_BYTES))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, or where a symlink points (not followed)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def assert_refused(argv: list, wanted: list[str], root: Path, capsys) -> str:
    """Run the CLI: one error line naming ``wanted``, exit 2, nothing under ``root`` changed."""
    before = snapshot(root)
    code, out, err = call(argv, capsys)
    check_one_error_line(code, out, err, wanted)
    assert snapshot(root) == before, "an input changed or an output was written"
    return out + err


# -- external data stays inside the model's folder -----------------------------------------------

def plant(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A model folder ``tmp_path/d`` whose external data reaches the secret ``tmp_path/secret``
    by ``case``; returns (model path, a substring the refusal names)."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    d = tmp_path / "d"
    if case == "dotdot":
        return external_model(d / "m.onnx", "../secret"), "outside the model's folder"
    if case == "deep-dotdot":
        return external_model(d / "m.onnx", "sub/../../secret"), "outside the model's folder"
    if case == "absolute":
        return external_model(d / "m.onnx", str(secret)), "outside the model's folder"
    if case == "symlink-out":
        model = external_model(d / "m.onnx", "m.data")
        (d / "m.data").symlink_to(secret)
        return model, "resolves through a symlink"
    if case == "symlinked-subfolder-out":
        model = external_model(d / "m.onnx", "sub/secret")
        (d / "sub").symlink_to(tmp_path)
        return model, "resolves through a symlink"
    if case == "hard-link":
        model = external_model(d / "m.onnx", "m.data")
        os.link(secret, d / "m.data")
        return model, "other hard links"
    raise AssertionError(case)


ESCAPES = ["dotdot", "deep-dotdot", "absolute", "symlink-out", "symlinked-subfolder-out",
           "hard-link"]
#: How the model path is spelled on the command line, run from the working directory named.
FORMS = {"bare": ("d", "m.onnx"), "dot": ("d", "./m.onnx"), "relative": (".", "d/m.onnx"),
         "absolute": (".", None), "symlinked-folder": (".", "link/m.onnx")}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", ESCAPES)
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_external_data_outside_the_model_folder_is_refused(command, case, form, tmp_path,
                                                           capsys, monkeypatch):
    model, wanted = plant(tmp_path, case)
    (tmp_path / "link").symlink_to(tmp_path / "d")
    np.savez(tmp_path / "calib.npz", x=np.ones((4, 16), np.float32))
    cwd, spelled = FORMS[form]
    monkeypatch.chdir(tmp_path / cwd)
    argv = [command, spelled or model]
    if command == "prune":
        argv += [tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz"]
    text = assert_refused(argv, ["tensor 'W'", wanted, "refusing to read it"], tmp_path, capsys)
    assert SECRET[:10].decode() not in text


@pytest.mark.parametrize("case", ESCAPES)
def test_load_model_never_reads_the_secret(case, tmp_path, monkeypatch):
    model, _ = plant(tmp_path, case)
    monkeypatch.chdir(model.parent)
    with pytest.raises(OptinError, match="refusing to read it"):
        io.load_model(model.name)


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((16, 32)).astype(np.float32)


def test_symlink_inside_the_folder_and_a_symlinked_folder_are_read(tmp_path, monkeypatch):
    d = tmp_path / "d"
    model = external_model(d / "m.onnx", "m.data")
    (d / "weights").mkdir()
    (d / "weights" / "real.data").write_bytes(weights().tobytes())
    (d / "m.data").symlink_to("weights/real.data")
    (tmp_path / "link").symlink_to(d)
    monkeypatch.chdir(tmp_path)
    for spelled in ("d/m.onnx", "link/m.onnx", str(model)):
        loaded = io.load_model(spelled)
        np.testing.assert_array_equal(loaded.graph.initializers["W"].const_value.numpy(),
                                      weights())


def hf_cache(root: Path, subfolder: str = "") -> Path:
    """A Hugging Face cache repository: the model and its data as blobs, shown in a snapshot
    through relative symlinks (``subfolder`` like ``onnx/`` as in many ONNX repositories)."""
    blobs, snap = root / "blobs", root / "snapshots" / "0123abc" / subfolder
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    external_model(blobs / "tmp.onnx", "model.onnx_data").rename(blobs / "aaaa")
    (blobs / "bbbb").write_bytes(weights().tobytes())
    up = os.path.relpath(blobs, snap)
    (snap / "model.onnx").symlink_to(f"{up}/aaaa")
    (snap / "model.onnx_data").symlink_to(f"{up}/bbbb")
    return snap / "model.onnx"


@pytest.mark.parametrize("subfolder", ["", "onnx"])
def test_hugging_face_cache_layout_is_read(subfolder, tmp_path):
    model = hf_cache(tmp_path / "models--org--name", subfolder)
    loaded = io.load_model(model)
    np.testing.assert_array_equal(loaded.graph.initializers["W"].const_value.numpy(), weights())


def test_hugging_face_snapshot_reaching_another_cache_is_refused(tmp_path):
    model = hf_cache(tmp_path / "models--org--name")
    other = tmp_path / "models--evil--other" / "blobs"
    other.mkdir(parents=True)
    (other / "cccc").write_bytes(SECRET[:WEIGHT_BYTES])
    data = model.parent / "model.onnx_data"
    data.unlink()
    data.symlink_to(os.path.relpath(other / "cccc", model.parent))
    with pytest.raises(OptinError, match="resolves through a symlink"):
        io.load_model(model)


# -- calibration archives are bounded by their own headers ---------------------------------------

def plain_model(d: Path) -> Path:
    """x [batch, 5, 8] -> MatMul -> Add -> LayerNormalization: loads, has one input 'x'."""
    from tests.test_cli import matmul_add_layernorm

    matmul_add_layernorm(d / "plain.onnx")
    return d / "plain.onnx"


def npy_bytes(shape: tuple[int, ...], body: bytes = b"") -> bytes:
    """An ``.npy`` header declaring float32 ``shape``, followed by ``body`` (not the data)."""
    import io as stdio

    buffer = stdio.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def patch_declared_size(path: Path, size: int) -> None:
    """Make the zip's local and central headers claim ``size`` uncompressed bytes for its member
    (what a zip bomb does: a small file whose entries inflate to gigabytes)."""
    data = bytearray(path.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 22:local + 26] = size.to_bytes(4, "little")
    data[central + 24:central + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def calib_case(name: str, d: Path) -> tuple[list, list[str]]:
    """Write calibration file ``d/c.npz`` for case ``name``; return (extra argv, wanted)."""
    import zipfile

    c = d / "c.npz"
    x = np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)
    if name == "npy-claims-1e12-elements":
        with zipfile.ZipFile(c, "w") as z:
            z.writestr("x.npy", npy_bytes((10**12,), b"\0" * 64))
        return [], ["'x' has shape (1000000000000,)", "over the limit", "--max-calib-gib"]
    if name == "zip-declares-3-gib":
        with zipfile.ZipFile(c, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x.npy", npy_bytes((4, 5, 8), x.tobytes()))
        patch_declared_size(c, 3 * 2**30)
        return ["--max-calib-gib", "1"], [f"declare {3 * 2**30} bytes", "over the limit"]
    if name == "deflated-zeros-over-a-lowered-limit":
        np.savez_compressed(c, x=np.zeros((4, 256, 256), np.float32))  # 1 MiB in a few KiB
        return ["--max-calib-gib", str(0.5 / 1024)], ["over the limit of 524288 bytes"]
    if name == "npy-header-longer-than-member":
        with zipfile.ZipFile(c, "w") as z:
            z.writestr("x.npy", npy_bytes((4, 5, 8), b"\0" * 16))
        return [], ["corrupt", "declares shape (4, 5, 8) (640 bytes)"]
    if name == "member-not-an-array":
        with zipfile.ZipFile(c, "w") as z:
            z.writestr("x.npy", "just some text, not an array")
        return [], ["member 'x' is not a numpy array"]
    if name == "object-array":
        np.savez(c, x=np.array([{"a": 1}] * 4, dtype=object))
        return [], ["'x' holds Python objects"]
    if name == "nan-in-one-sample":
        x[2, 1, 3] = np.nan
        np.savez(c, x=x)
        return [], ["array 'x' has NaN or Inf values in 1 of 4 samples (first: sample 2)"]
    if name == "inf-in-two-samples":
        x[1, 0, 0] = np.inf
        x[3, 0, 0] = -np.inf
        np.savez(c, x=x)
        return [], ["in 2 of 4 samples (first: sample 1)"]
    raise AssertionError(name)


CALIB_CASES = ["npy-claims-1e12-elements", "zip-declares-3-gib",
               "deflated-zeros-over-a-lowered-limit", "npy-header-longer-than-member",
               "member-not-an-array", "object-array", "nan-in-one-sample", "inf-in-two-samples"]


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("case", CALIB_CASES)
def test_bad_calibration_archive_is_refused_before_inflating(case, command, tmp_path, capsys,
                                                             monkeypatch):
    model = plain_model(tmp_path)
    extra, wanted = calib_case(case, tmp_path)
    if "nan" not in case and "inf" not in case:
        def inflate(*args, **kwargs):
            raise AssertionError("an array was inflated before the headers were checked")
        monkeypatch.setattr(np, "load", inflate)
    argv = [command, model, *([tmp_path / "o.onnx"] if command == "prune" else []),
            "--calib", tmp_path / "c.npz", *extra]
    assert_refused(argv, ["c.npz", *wanted], tmp_path, capsys)


def test_raising_the_limit_admits_the_same_archive(tmp_path, capsys):
    model = plain_model(tmp_path)
    np.savez_compressed(tmp_path / "c.npz", x=np.zeros((4, 5, 8), np.float32))
    low = str(100 / 2**30)  # under the archive's 640 bytes of array data
    code, out, err = call(["analyze", model, "--calib", tmp_path / "c.npz",
                           "--max-calib-gib", low], capsys)
    check_one_error_line(code, out, err, ["over the limit of 100 bytes"])
    code, out, err = call(["analyze", model, "--calib", tmp_path / "c.npz"], capsys)
    assert "over the limit" not in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_calibration_limit_must_be_positive_and_finite(value, tmp_path, capsys):
    model = plain_model(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 5, 8), np.float32))
    code, out, err = call(["analyze", model, "--calib", tmp_path / "c.npz",
                           "--max-calib-gib", value], capsys)
    check_one_error_line(code, out, err, ["--max-calib-gib must be", f"got {float(value)}"])


# -- the Python API checks calibration like the CLI -----------------------------------------------

@pytest.mark.parametrize("arrays, wanted", [
    ({"x": np.zeros((0, 5, 8), np.float32)}, "calibration data has zero samples"),
    ({"x": np.float32(1.0)}, "array 'x' is a scalar"),
    ({"x": np.full((3, 5, 8), np.nan, np.float32)}, "NaN or Inf values in 3 of 3 samples"),
])
def test_api_calibration_mapping_gets_the_npz_errors(arrays, wanted, tmp_path):
    from optin_onnx.pipeline import analyze

    with pytest.raises(OptinError, match=wanted.replace("(", r"\(")):
        analyze(plain_model(tmp_path), arrays)


def test_api_reads_a_calibration_path_and_accepts_np_load(tmp_path):
    from optin_onnx.pipeline import analyze

    model = plain_model(tmp_path)
    with pytest.raises(OptinError, match="calibration file .*missing.npz does not exist"):
        analyze(model, tmp_path / "missing.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 7, 8), np.float32))
    with np.load(tmp_path / "c.npz") as archive:
        _, structure = analyze(model, archive)
    assert structure is not None
    with pytest.raises(OptinError, match="an .npz path or a mapping of arrays, got list"):
        analyze(model, [np.zeros((2, 7, 8), np.float32)])


# -- what the tool writes never replaces what it reads --------------------------------------------

def model_with_data(d: Path) -> Path:
    """A loadable model ``d/m.onnx`` whose weights live in ``d/m.data``."""
    model = external_model(d / "m.onnx", "m.data")
    (d / "m.data").write_bytes(weights().tobytes())
    return model


def write_case(name: str, d: Path) -> tuple[list, list[str]]:
    """Files for one unsafe ``prune`` write in ``d`` (run from ``d``); (argv, wanted)."""
    model_with_data(d)
    np.savez(d / "c.npz", x=np.ones((4, 2, 16), np.float32))
    base = ["prune", "m.onnx"]
    if name == "report-is-model":
        return base + ["o.onnx", "--calib", "c.npz", "--report", "m.onnx"], \
            ["--report path is the input path"]
    if name == "report-is-model-via-dotdot":
        (d / "sub").mkdir()
        return base + ["o.onnx", "--calib", "c.npz", "--report", "sub/../m.onnx"], \
            ["--report path is the input path"]
    if name == "report-is-calib":
        return base + ["o.onnx", "--calib", "c.npz", "--report", "./c.npz"], \
            ["--report path is the calibration file"]
    if name == "out-is-calib":
        return base + ["c.npz", "--calib", "c.npz"], ["output path is the calibration file"]
    if name == "report-is-out":
        return base + ["o.onnx", "--calib", "c.npz", "--report", d / "o.onnx"], \
            ["--report path is the output path"]
    if name == "out-is-symlink-to-model":
        (d / "link.onnx").symlink_to("m.onnx")
        return base + ["link.onnx", "--calib", "c.npz"], ["output path is the input path"]
    if name == "out-is-hard-link-of-calib":
        os.link(d / "c.npz", d / "hard.npz")
        return base + ["hard.npz", "--calib", "c.npz"], ["output path is the calibration file"]
    if name == "out-is-external-data":
        return base + ["m.data", "--calib", "c.npz"], \
            ["output path is the input model's external data file"]
    if name == "report-is-external-data":
        return base + ["o.onnx", "--calib", "c.npz", "--report", "m.data"], \
            ["--report path is the input model's external data file"]
    if name == "out-is-a-directory":
        (d / "dir").mkdir()
        return base + ["dir", "--calib", "c.npz"], ["output path dir is a directory"]
    if name == "out-folder-missing":
        return base + ["missing/o.onnx", "--calib", "c.npz"], ["missing is not an existing folder"]
    if name == "report-folder-missing":
        return base + ["o.onnx", "--calib", "c.npz", "--report", "missing/r.json"], \
            ["cannot write --report path", "missing is not an existing folder"]
    if name == "out-folder-is-a-file":
        (d / "file.txt").write_text("x")
        return base + ["file.txt/o.onnx", "--calib", "c.npz"], ["file.txt is not an existing folder"]
    raise AssertionError(name)


WRITE_CASES = ["report-is-model", "report-is-model-via-dotdot", "report-is-calib", "out-is-calib",
               "report-is-out", "out-is-symlink-to-model", "out-is-hard-link-of-calib",
               "out-is-external-data", "report-is-external-data", "out-is-a-directory",
               "out-folder-missing", "report-folder-missing", "out-folder-is-a-file"]


@pytest.mark.parametrize("case", WRITE_CASES)
def test_unsafe_write_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    argv, wanted = write_case(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, wanted, tmp_path, capsys)


def test_unwritable_output_folder_is_refused(tmp_path, capsys, monkeypatch):
    from optin_onnx import guard

    argv, _ = write_case("report-is-model", tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(guard.os, "access",
                        lambda p, mode: False if Path(p).name == "ro" else real_access(p, mode))
    assert_refused(["prune", "m.onnx", "ro/o.onnx", "--calib", "c.npz"], ["ro is not writable"],
                   tmp_path, capsys)


def test_api_refuses_output_over_the_calibration_file(tmp_path):
    from optin_onnx.pipeline import prune

    model_with_data(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.ones((4, 2, 16), np.float32))
    before = snapshot(tmp_path)
    with pytest.raises(OptinError, match="output path is the calibration file"):
        prune(tmp_path / "m.onnx", tmp_path / "c.npz", output=tmp_path / "c.npz")
    with pytest.raises(OptinError, match="--report path is the output path"):
        prune(tmp_path / "m.onnx", tmp_path / "c.npz", output=tmp_path / "o.onnx",
              report_path=tmp_path / "o.onnx")
    assert snapshot(tmp_path) == before


def make_calib_case(name: str, d: Path) -> tuple[list, list[str]]:
    """Files for one unsafe ``make-calib`` write in ``d``; (argv, wanted)."""
    (d / "texts.txt").write_text("one text\nanother text\n")
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text("{}")
    if name == "out-is-texts":
        return ["make-calib", "texts.txt", "tok", "./texts.txt"], \
            ["output path is the texts file"]
    if name == "out-is-tokenizer-json":
        return ["make-calib", "texts.txt", "tok", "tok/tokenizer.json"], \
            ["output path is the tokenizer file"]
    if name == "out-is-tokenizer-config":
        (d / "tok" / "tokenizer_config.json").write_text("{}")
        return ["make-calib", "texts.txt", "tok", "tok/../tok/tokenizer_config.json"], \
            ["output path is the tokenizer file"]
    if name == "out-is-symlink-to-texts":
        (d / "c.npz").symlink_to("texts.txt")
        return ["make-calib", "texts.txt", "tok", "c.npz"], ["output path is the texts file"]
    if name == "out-under-a-file":
        return ["make-calib", "texts.txt", "tok", "texts.txt/sub/c.npz"], \
            ["texts.txt is not an existing folder"]
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["out-is-texts", "out-is-tokenizer-json",
                                  "out-is-tokenizer-config", "out-is-symlink-to-texts",
                                  "out-under-a-file"])
def test_make_calib_never_overwrites_its_inputs(case, tmp_path, capsys, monkeypatch):
    argv, wanted = make_calib_case(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, wanted, tmp_path, capsys)


# -- signals clean up, outputs get the user's mode ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TINY = ("torchscript", "classifier", False)

#: Runs the CLI, sending itself ``signal.<name>`` once the staged model is on disk, just before
#: it would be moved over OUT: the moment a killed run leaves the most behind.
SIGNAL_DURING_SAVE = """
import os, signal, sys
from optin_onnx import cli, io
flush = io._fsync
def flush_then_signal(path):
    flush(path)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
io._fsync = flush_then_signal
sys.exit(cli.main(sys.argv[2:]))
"""


def tiny_run(d: Path, tiny: Path) -> list:
    """Files for a quick prune of the tiny BERT in ``d``; its argv (model, OUT, options)."""
    from tests.helpers import tiny_feeds

    (d / "in.onnx").write_bytes(tiny.read_bytes())
    np.savez(d / "c.npz", **tiny_feeds(8, 12))
    return ["prune", d / "in.onnx", d / "out.onnx", "--calib", d / "c.npz", "--latency", "",
            "--simplify", "off", "--samples", "8", "--quiet"]


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signal_while_saving_leaves_nothing_behind(name, status, tiny_exports, tmp_path):
    import subprocess
    import sys

    argv = tiny_run(tmp_path, tiny_exports[TINY])
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, "-c", SIGNAL_DURING_SAVE, name, *map(str, argv)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == status, p.stderr
    assert p.stderr.splitlines()[-1] in (f"optin-onnx: terminated by {name}",
                                         "optin-onnx: interrupted")
    assert "Traceback" not in p.stderr
    assert snapshot(tmp_path) == before, "a temporary copy or a partial output was left"
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "in.onnx"]


def test_outputs_get_the_umask_mode(tiny_exports, tmp_path, capsys):
    import stat

    from optin_onnx.calibdata import write_calibration

    argv = tiny_run(tmp_path, tiny_exports[TINY]) + ["--report", tmp_path / "r.json"]
    old = os.umask(0o027)
    try:
        code, out, err = call(argv, capsys)
        write_calibration({"x": np.zeros((2, 3))}, tmp_path / "made.npz")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("out.onnx", "r.json", "made.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# -- every option is checked up front; nothing non-finite passes --------------------------------

OPTION_CASES = [
    (["--lam", "nan"], "--lam must be finite, got nan"),
    (["--lam", "inf"], "--lam must be finite, got inf"),
    (["--lam", "-1"], "--lam must be at least 0, got -1.0"),
    (["--tolerance", "nan"], "--tolerance must be finite, got nan"),
    (["--tolerance", "inf"], "--tolerance must be finite, got inf"),
    (["--tolerance=-1e-4"], "--tolerance must be at least 0, got -0.0001"),
    (["--flops", "nan"], "--flops must be in (0, 1], got nan"),
    (["--samples", "0"], "--samples must be at least 1, got 0"),
    (["--samples", "-3"], "--samples must be at least 1, got -3"),
    (["--samples", "1.5"], "argument --samples: invalid int value: '1.5'"),
    (["--tokens", "0"], "--tokens must be at least 1, got 0"),
    (["--neuron-group", "0"], "--neuron-group must be at least 1, got 0"),
    (["--ffn-multiple", "-2"], "--ffn-multiple must be at least 1, got -2"),
    (["--round", "-2"], "--ffn-multiple must be at least 1, got -2"),  # the old spelling
    (["--channel-multiple", "0"], "--channel-multiple must be at least 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--steps", "0"], "--rounds must be at least 1, got 0"),  # the old spelling
    (["--latency", "0x128"], "--latency batch size must be at least 1, got 0"),
    (["--latency", "1x-5"], "--latency sequence length must be at least 0, got -5"),
    (["--latency", "16by1"], "expected BATCHxSEQ"),
    (["--latency-seconds", "0"], "--latency-seconds must be above 0, got 0.0"),
    (["--latency-seconds", "nan"], "--latency-seconds must be finite, got nan"),
    (["--max-calib-gib", "inf"], "--max-calib-gib must be finite, got inf"),
]


@pytest.mark.parametrize("extra, wanted", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_option_is_one_line_before_any_work(extra, wanted, tmp_path, capsys, monkeypatch):
    import optin_onnx.stages.prepare as prepare

    model_with_data(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.ones((4, 2, 16), np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "as_model", lambda *a: pytest.fail("the model was loaded"))
    assert_refused(["prune", "m.onnx", "o.onnx", "--calib", "c.npz", *extra], [wanted], tmp_path,
                   capsys)


@pytest.mark.parametrize("argv, wanted", [
    (["analyze", "m.onnx", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["analyze", "m.onnx", "--seq-len", "x"], "argument --seq-len: invalid int value: 'x'"),
    (["make-calib", "t.txt", "tok", "c.npz", "--samples", "0"], "--samples must be at least 1"),
    (["make-calib", "t.txt", "tok", "c.npz", "--samples", "-1"], "--samples must be at least 1"),
])
def test_bad_option_of_analyze_and_make_calib(argv, wanted, tmp_path, capsys, monkeypatch):
    model_with_data(tmp_path)
    (tmp_path / "t.txt").write_text("a text\n")
    monkeypatch.chdir(tmp_path)
    assert_refused(argv, [wanted], tmp_path, capsys)


@pytest.mark.parametrize("override, wanted", [
    ({"flops": "0.6"}, "--flops must be in (0, 1], got '0.6'"),
    ({"samples": True}, "--samples must be an integer, got True"),
    ({"tokens": 7.5}, "--tokens must be an integer, got 7.5"),
    ({"lam": float("nan")}, "--lam must be finite, got nan"),
    ({"prune": "all"}, "--prune must be one of heads, neurons, both, got 'all'"),
    ({"feature_kind": "x"}, "--feature must be one of auto, ffn, residual-ln, blocks, got 'x'"),
    ({"reconstruct": "yes"}, "--reconstruct must be one of none, scales, refit, got 'yes'"),
    ({"latency_cases": [(1, 2, 3)]}, "--latency must be (batch, sequence) pairs, got (1, 2, 3)"),
])
def test_api_options_are_checked_like_the_cli(override, wanted, tmp_path):
    from optin_onnx.pipeline import PruneOptions, prune

    options = PruneOptions()
    with pytest.raises(OptinError, match=wanted.replace("(", r"\(").replace(")", r"\)")):
        prune(tmp_path / "never-loaded.onnx", {}, options, **override)
    assert options == PruneOptions(), "the caller's options object was modified"


def test_a_nan_difference_fails_verification():
    import math

    from optin_onnx.verify import VerifyResult, worst

    assert math.isnan(worst(0.0, 1e-6, math.nan))
    assert math.isnan(worst(math.nan, 0.0))
    assert worst(0.0, 2e-5, 1e-6) == 2e-5
    for error in (math.nan, math.inf):
        result = VerifyResult(error, error, 1e-4)
        assert not result.passed and "non-finite" in result.failure()
    assert VerifyResult(5e-5, 5e-5, 1e-4).passed


def test_model_giving_nan_fails_verification_and_writes_nothing(tiny_exports, tmp_path, capsys):
    """A NaN weight makes every output NaN, dense and slim alike; ``max(0.0, nan)`` used to
    report that as a 0 difference and write the model."""
    argv = tiny_run(tmp_path, tiny_exports[TINY])
    proto = onnx.load(str(tmp_path / "in.onnx"))
    weight = next(t for t in proto.graph.initializer if t.name == "classifier.weight")
    array = numpy_helper.to_array(weight).copy()
    array[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(tmp_path / "in.onnx"))
    assert_refused(argv, ["verification failed", "non-finite outputs or differences"], tmp_path,
                   capsys)


# -- models the tool cannot take are refused at load ----------------------------------------------

def save_graph(path: Path, nodes, inits, dtype=TensorProto.FLOAT, out_shape=(2, 32)) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [2, 16])],
                              [helper.make_tensor_value_info("y", dtype, list(out_shape))], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def bad_model_case(name: str, d: Path) -> tuple[Path, list[str]]:
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"], name="a")
    w = numpy_helper.from_array(np.ones((16, 32), np.float32), "W")
    if name == "float16":
        w16 = numpy_helper.from_array(np.ones((16, 32), np.float16), "W")
        return save_graph(d / "m.onnx", [matmul], [w16], TensorProto.FLOAT16), \
            ["float16/bfloat16 models are not supported", "input 'x' is FLOAT16"]
    if name == "duplicate-value-name":
        twice = helper.make_node("MatMul", ["x", "W"], ["y"], name="b")
        return save_graph(d / "m.onnx", [matmul, twice], [w]), \
            ["is not a valid ONNX graph", "'y' is redeclared"]
    if name == "weight-data-short":
        w.raw_data = w.raw_data[:100]
        return save_graph(d / "m.onnx", [matmul], [w]), \
            ["is corrupt: initializer 'W' (FLOAT, shape [16, 32]) does not hold the data"]
    raise AssertionError(name)


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("case", ["float16", "duplicate-value-name", "weight-data-short"])
def test_model_the_tool_cannot_take_is_one_line(case, command, tmp_path, capsys):
    model, wanted = bad_model_case(case, tmp_path)
    np.savez(tmp_path / "c.npz", x=np.ones((4, 16), np.float32))
    argv = [command, model, *([tmp_path / "o.onnx", "--calib", tmp_path / "c.npz"]
                              if command == "prune" else [])]
    assert_refused(argv, ["m.onnx", *wanted], tmp_path, capsys)


# -- token calibration the model cannot run on ----------------------------------------------------

def token_case(name: str, feeds: dict[str, np.ndarray]) -> str:
    """Spoil ``feeds`` (tiny BERT inputs, 8 samples) for case ``name``; return what is named."""
    if name == "id-past-the-vocabulary-in-a-later-sample":
        feeds["input_ids"][5, 3] = 100
        return "array 'input_ids' has id 100 in sample 5, outside the embedding table"
    if name == "negative-id":
        feeds["input_ids"][2, 0] = -7
        return "array 'input_ids' has id -7 in sample 2"
    if name == "token-type-past-its-table":
        feeds["token_type_ids"][6, 1] = 2
        return "array 'token_type_ids' has id 2 in sample 6, outside the embedding table it " \
            "indexes (ids must be in [0, 2))"
    if name == "mask-not-zero-one":
        feeds["attention_mask"][4, 0] = 2
        return "array 'attention_mask' holds values other than 0 and 1 (first in sample 4)"
    if name == "all-zero-mask":
        feeds["attention_mask"][3] = 0
        return "array 'attention_mask' is all zeros in 1 samples (first: sample 3)"
    if name == "zero-tokens":
        for key in feeds:
            feeds[key] = feeds[key][:, :0]
        return "has shape (8, 0): every sample is empty"
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["id-past-the-vocabulary-in-a-later-sample", "negative-id",
                                  "token-type-past-its-table", "mask-not-zero-one",
                                  "all-zero-mask", "zero-tokens"])
def test_token_calibration_the_model_cannot_run_is_one_line(case, tiny_exports, tmp_path, capsys):
    from tests.helpers import tiny_feeds

    feeds = tiny_feeds(8, 12)
    wanted = token_case(case, feeds)
    np.savez(tmp_path / "c.npz", **feeds)
    assert_refused(["prune", tiny_exports[TINY], tmp_path / "o.onnx", "--calib",
                    tmp_path / "c.npz"], ["c.npz", wanted], tmp_path, capsys)


def test_onnxruntime_warnings_never_reach_stderr(tmp_path):
    """After the CLI has run, a session built with default options (as onnxsim builds them) on a
    graph onnxruntime warns about prints nothing: its default logger was set to errors only."""
    import subprocess
    import sys

    w = numpy_helper.from_array(np.ones((16, 32), np.float32), "W")
    unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
    model = save_graph(tmp_path / "m.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [w, unused], out_shape=(2, 99))
    script = ("import contextlib, sys, onnxruntime as ort\nfrom optin_onnx import cli\n"
              "with contextlib.suppress(SystemExit):\n"
              "    cli.main(['analyze', sys.argv[1]])  # 'no prunable structure': exit 1\n"
              "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n")
    p = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert "onnxruntime" not in p.stderr, p.stderr


# -- shapes the model cannot take never throw a finished prune away -------------------------------

def test_latency_and_verify_shapes_past_the_position_table_are_skipped(tiny_exports, tmp_path,
                                                                      capsys):
    """The tiny BERT has 256 positions: calibration 250 tokens long makes verify's longer case
    (258) impossible, and a 1x300 latency case too; both are reported as skipped and the pruned
    model is written."""
    import json

    from tests.helpers import tiny_feeds

    (tmp_path / "in.onnx").write_bytes(tiny_exports[TINY].read_bytes())
    np.savez(tmp_path / "c.npz", **tiny_feeds(4, 250))
    code, out, err = call(["prune", tmp_path / "in.onnx", tmp_path / "out.onnx", "--calib",
                           tmp_path / "c.npz", "--latency", "1x300,1x16", "--latency-seconds",
                           "0.5", "--samples", "4", "--quiet", "--report", tmp_path / "r.json"],
                          capsys)
    assert code == 0, err
    assert "onnxruntime" not in err, "onnxruntime's log lines reached stderr"
    report = json.loads((tmp_path / "r.json").read_text())
    cases = report["verify"]["cases"]  # batch 1 and 3 at the mean real length
    assert report["verify"]["passed"] and [c.split("x")[0] for c in cases] == ["1", "3"]
    assert [s.split(":")[0] for s in report["verify"]["skipped"]] == ["1x258", "3x258"]
    assert list(report["latency"]) == ["cpu b1 s16"]
    assert any(n.startswith("latency case b1 s300 skipped: onnxruntime cannot run the model")
               for n in report["notes"])
    assert "verify case 1x258: the input model cannot run at this shape" in " ".join(
        report["notes"])
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_tolerance_is_relative_to_the_output_scale():
    from optin_onnx.verify import VerifyResult

    # An error of 2.3e-3 on outputs in the hundreds is float32 rounding, not a wrong prune.
    assert VerifyResult(2.3e-3, 2.3e-3 / 300, 1e-4).passed
    assert not VerifyResult(2.3e-3, 2.3e-3, 1e-4).passed
    assert "relative to the output's scale" in VerifyResult(2.3e-3, 2.3e-3, 1e-4).failure()


def test_correct_prune_of_a_wide_mlp_with_large_outputs_passes_verify(tmp_path, capsys):
    """Random-weight MLP of width 3072: outputs in the tens to hundreds, so float32 rounding
    alone differs by more than the absolute 1e-4 a correct prune was once refused for."""
    import json

    rng = np.random.default_rng(0)
    d, h = 64, 3072
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
             helper.make_node("Add", ["a", "b1"], ["ab"], name="add1"),
             helper.make_node("Relu", ["ab"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="add2")]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W1", (d, h)), ("b1", (h,)), ("W2", (h, d)), ("b2", (d,)))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "mlp.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 8, d)).astype(np.float32))
    code, out, err = call(["prune", tmp_path / "mlp.onnx", tmp_path / "o.onnx", "--calib",
                           tmp_path / "c.npz", "--latency", "", "--simplify", "off", "--quiet",
                           "--samples", "16", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verify["passed"] and verify["max_scaled_err"] < verify["max_abs_err"]
    assert verify["tolerance_rule"] == "max |slim - dense| / max(1, max |dense|), per output"
