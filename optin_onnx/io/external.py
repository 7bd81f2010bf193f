"""External data: every file a model's initializers point to must lie inside the model's folder
(or, for a Hugging Face cache snapshot, its own blobs folder); references are pinned to the
resolved files so nothing re-resolves them later."""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import onnx_ir as ir

from optin_onnx.errors import OptinError


def contain_external_data(model: ir.Model, source: str, shown: str) -> None:
    """Refuse external data outside the model's folder, and pin each reference to its real file.

    A model is a file anyone can hand over; its external-data ``location`` must not make the tool
    read (and copy into OUT) a file beside or above it, such as ``../../etc/passwd``. onnx-ir
    checks this only when the model path has a directory part, and only when a tensor is read,
    as a ``ValueError``. Here every form is refused up front, for initializers, tensor attributes
    and function bodies alike. Each reference is then replaced by one naming the resolved file
    directly, so nothing later resolves the location again against a different base, and a
    symlink swapped after this check is not followed.

    A Hugging Face cache (``<cache>/snapshots/<rev>/...``, files symlinked into
    ``<cache>/blobs``) is a legitimate layout: a target directly in that same cache's ``blobs``
    folder is accepted.
    """
    folder = os.path.dirname(source)
    real_folder = os.path.realpath(folder)
    blobs = _hf_cache_blobs(folder)
    for tensor, put, _ in external_tensor_sites(model):
        location = os.fspath(tensor.location)
        where = f"model {shown}: external data of tensor '{tensor.name}' at '{location}'"
        if not location or "\0" in location or os.path.isabs(location) or not _within(
            os.path.normpath(os.path.join(folder, location)), folder
        ):
            raise OptinError(f"{where} is outside the model's folder {folder}: refusing to read it")
        real = os.path.realpath(os.path.join(folder, location))
        if not _within(real, real_folder) and not (blobs and os.path.dirname(real) == blobs):
            raise OptinError(
                f"{where} resolves through a symlink to {real}, outside the model's folder"
                f" {folder}: refusing to read it"
            )
        if os.path.isfile(real) and os.stat(real).st_nlink > 1:
            raise OptinError(
                f"{where}: {real} has other hard links, so it may be a file from outside the"
                " model's folder: refusing to read it (replace it with a copy of itself)"
            )
        put(
            ir.ExternalTensor(
                os.path.basename(real),
                offset=tensor.offset,
                length=tensor.length,
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
                doc_string=tensor.doc_string,
                metadata_props=dict(tensor.metadata_props),
                base_dir=os.path.dirname(real),
            )
        )


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (both absolute and normalised)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _hf_cache_blobs(folder: str) -> str | None:
    """The real ``blobs`` folder of the Hugging Face cache ``folder`` is a snapshot in, if any.

    The cache stores each repository as ``<cache>/blobs/<hash>`` and shows each revision as
    ``<cache>/snapshots/<rev>/<file>`` symlinks into it (``../../blobs/<hash>``, one ``..`` more
    per subfolder), so ``folder`` is in a snapshot when one of its ancestors is a direct child
    of a folder named ``snapshots`` that has a sibling ``blobs``.
    """
    ancestor = folder
    while os.path.dirname(ancestor) != ancestor:
        parent = os.path.dirname(ancestor)
        if os.path.basename(parent) == "snapshots":
            blobs = os.path.join(os.path.dirname(parent), "blobs")
            return os.path.realpath(blobs) if os.path.isdir(blobs) else None
        ancestor = parent
    return None


def check_external_data(model: ir.Model, path: str) -> None:
    """Check each external data file exists and is long enough, before anything reads it lazily."""
    for tensor, _, _ in external_tensor_sites(model):
        data_path = tensor.path
        if not os.path.isfile(data_path):
            raise OptinError(
                f"model {path} needs external data file {data_path} (for tensor '{tensor.name}'),"
                " which does not exist: copy it next to the model"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = os.path.getsize(data_path)
        if size < end:
            raise OptinError(
                f"external data file {data_path} of model {path} is truncated: tensor '{tensor.name}'"
                f" needs bytes up to {end}, the file has {size}"
            )


# An external tensor, a function that puts a replacement tensor where it sits, and whether it is
# an initializer (as opposed to the value of a node attribute such as Constant's).
_Site = tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None], bool]


def external_tensor_sites(model: ir.Model) -> list[_Site]:
    """Every tensor in ``model`` whose data lives in an external file, and where it sits."""
    sites: list[_Site] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                sites.append((value.const_value, functools.partial(setattr, value, "const_value"), True))
    for node in all_nodes(model):
        for name, attr in node.attributes.items():
            if attr.is_ref() or attr.type != ir.AttributeType.TENSOR:
                continue
            if isinstance(attr.value, ir.ExternalTensor):
                sites.append((attr.value, functools.partial(_set_tensor_attribute, node, name), False))
    return sites


def _set_tensor_attribute(node: ir.Node, name: str, tensor: ir.TensorProtocol) -> None:
    node.attributes[name] = ir.Attr(name, ir.AttributeType.TENSOR, tensor)


@contextlib.contextmanager
def inlined(
    sites: list[tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None]]],
) -> Iterator[None]:
    """Temporarily replace external tensors with in-memory copies, so saving embeds their data.

    The originals are put back afterwards: saving must not change the caller's model.
    """
    originals = [tensor for tensor, _ in sites]
    copies = ir.external_data.convert_tensors_from_external(originals)
    for (_, put), copy in zip(sites, copies):
        put(copy)
    try:
        yield
    finally:
        for (_, put), original in zip(sites, originals):
            put(original)


def initializer_bytes(model: ir.Model) -> int:
    """Total initializer size, from shapes and dtypes alone (lazy external data is not read)."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node: main graph, subgraphs (If/Loop/Scan bodies) and model-local functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)
