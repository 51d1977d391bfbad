"""Export a bi-encoder to ONNX with pooling and normalisation inside the graph, then verify it.

The graph is the :class:`~embedtune.BiEncoder` forward itself (backbone → pooling → L2), traced by
``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``): it exports transformers 5
Llama/Ministral3/BERT models in about a second, and on the models we tested gives the same graph
quality as the dynamo exporter, which takes far longer. Inputs and output::

    input_ids       int64 (batch, sequence)
    attention_mask  int64 (batch, sequence)      1 = real token, either padding side
    pooling_mask    int64 (batch, sequence)      only when pool_instruction is false: 0 = prefix token
    embeddings      float32 (batch, dim)         pooled (+ L2-normalised when the model normalises)

Tracing bakes Python control flow in, so the trace input is a *padded* batch: transformers skips the
attention mask for unpadded inputs, and a graph traced that way would let padding leak into real
tokens. The verification after export (see :mod:`embedtune.export.verify`) runs other lengths, batch
sizes and both padding sides, which catches any shape that was baked in.

Precisions: ``fp32``; ``fp16`` (the fp32 graph converted with ONNX Runtime's float16 converter,
inputs/outputs kept int64/float32); ``--quantize int8`` (the fp32 graph's MatMul weights in int8 blocks
of 32, ONNX Runtime's ``MatMulNBits``; see ``_quantize_int8`` for why not ``quantize_dynamic``).
A model over 2 GB is written with its weights
in one external data file, ``model.onnx_data``, because a protobuf file cannot exceed 2 GB.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedtune._atomic import install_folder
from embedtune.export.errors import OnnxExportError, VerificationError, require_int8, require_onnx
from embedtune.export.runtime import ONNX_FILE, OnnxBiEncoder, is_onnx_export
from embedtune.export.verify import (
    MIN_COSINE,
    NDCG_BUDGET_S,
    NDCG_MAX_LENGTH,
    VERIFY_TEXTS,
    ParityReport,
    SmallEvalSet,
    compare,
    compare_ndcg,
    embed_batches,
    preserved_modes,
    verification_batches,
)
from embedtune.models.settings import EncoderSettings

if TYPE_CHECKING:
    from embedtune.models.biencoder import BiEncoder

logger = logging.getLogger(__name__)

EXTERNAL_DATA_FILE = "model.onnx_data"
DEFAULT_OPSET = 17
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8",)
# Protobuf refuses messages of 2 GiB and more; stay clear of the limit (graph structure adds bytes).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and measured."""

    folder: Path
    """The export folder (``model.onnx``, tokenizer files, ``embedtune.json``)."""
    dtype: str
    quantize: str | None
    opset: int
    inputs: tuple[str, ...]
    external_data: bool
    parity: ParityReport | None = None
    """PyTorch vs the written model (None with ``verify=False``)."""
    fp32_parity: ParityReport | None = None
    """PyTorch vs the fp32 graph before int8 quantisation (int8 exports only)."""
    ndcg: dict[str, float] = field(default_factory=dict)
    """``{"fp32": x, "int8": y, "delta": y - x}`` on a small BEIR slice (int8 with evaluation data)."""
    ndcg_slice: dict[str, Any] = field(default_factory=dict)
    """What the NDCG check covered: ``{"name", "queries", "documents", "total_documents", "seconds"}``."""
    min_cosine: float | None = None
    """The gate the written model passed (worst cosine vs PyTorch); None without verification."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "quantize": self.quantize,
            "opset": self.opset,
            "inputs": list(self.inputs),
            "external_data": self.external_data,
            "verification": self.parity.to_dict() if self.parity else None,
            "fp32_verification": self.fp32_parity.to_dict() if self.fp32_parity else None,
            "ndcg@10": self.ndcg or None,
            "ndcg_slice": self.ndcg_slice or None,
            "min_cosine_gate": self.min_cosine,
        }


class EmbeddingGraph(torch.nn.Module):
    """The exported function: ``(input_ids, attention_mask[, pooling_mask]) -> embeddings``.

    Args:
        model: the bi-encoder (its forward pools and normalises).
        with_pooling_mask: take the ``pooling_mask`` input (instruction tokens excluded from pooling);
            without it the graph pools over ``attention_mask``.
    """

    def __init__(self, model: BiEncoder, *, with_pooling_mask: bool):
        super().__init__()
        self.model = model
        self.with_pooling_mask = with_pooling_mask

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, attention_mask, pooling_mask if self.with_pooling_mask else None)


def _opset_range() -> tuple[int, int]:
    """Opsets the TorchScript exporter of this torch writes (a private module: fall back if it moves)."""
    try:
        import torch.onnx._constants as constants

        return int(constants.ONNX_MIN_OPSET), int(constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, 20


def _check_options(dtype: str, quantize: str | None, opset: int) -> None:
    if dtype not in DTYPES:
        raise OnnxExportError(f"--dtype: unknown {dtype!r} — use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise OnnxExportError(f"--quantize: unknown {quantize!r} — use {', '.join(QUANTIZATIONS)}")
    if quantize is not None and dtype != "fp32":
        raise OnnxExportError("--quantize int8 starts from the fp32 graph — drop --dtype fp16")
    oldest, newest = _opset_range()
    if not isinstance(opset, int) or opset > newest:
        raise OnnxExportError(
            f"--opset {opset}: this torch exports opsets {oldest}-{newest} — use --opset {DEFAULT_OPSET}"
        )
    if opset < oldest:
        raise OnnxExportError(
            f"--opset {opset} is too old: torch exports opset {oldest} and newer — use --opset {DEFAULT_OPSET}"
        )


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OnnxExportError(f"{output}: exists and is not a folder — choose another --output")
    if output.is_dir() and any(output.iterdir()) and not is_onnx_export(output):
        raise OnnxExportError(
            f"{output}: folder is not empty and is not an earlier ONNX export — choose an empty or new --output"
        )


def _load_model(model: str | os.PathLike[str] | BiEncoder, max_length: int | None) -> BiEncoder:
    from embedtune.models.auto import AutoBiEncoder
    from embedtune.models.biencoder import BiEncoder

    if isinstance(model, BiEncoder):
        return model
    path = str(model)
    if is_onnx_export(path) and not (Path(path) / "config.json").is_file():
        raise OnnxExportError(f"{path}: is already an ONNX export — give the PyTorch model it came from")
    # fp32 weights: an export in fp16 is converted from the fp32 graph, never traced in half precision.
    return AutoBiEncoder.from_pretrained(path, dtype="float32", max_length=max_length)


def _merge_lora(model: BiEncoder) -> bool:
    """Fold LoRA adapters into the base weights (in place); True when there were any."""
    backbone = model.backbone
    if not hasattr(backbone, "merge_and_unload"):
        return False
    model.backbone = backbone.merge_and_unload()
    return True


def _trace_inputs(model: BiEncoder, with_pooling_mask: bool) -> tuple[Any, ...]:
    """A padded batch of two, so that the traced graph keeps the attention mask (see module doc)."""
    feats = model.tokenize(["a first example text for tracing the graph", "short"], "document")
    ids, mask = feats["input_ids"], feats["attention_mask"]
    if bool(mask.all()):  # a tokenizer that made both the same length: pad by hand
        import torch

        pad = model.tokenizer.pad_token_id
        ids = torch.cat([ids, torch.full((2, 2), pad, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros((2, 2), dtype=mask.dtype)], 1)
        feats["pooling_mask"] = torch.cat([feats["pooling_mask"], torch.zeros((2, 2), dtype=mask.dtype)], 1)
    return (ids, mask, feats["pooling_mask"]) if with_pooling_mask else (ids, mask)


def _torch_export(
    graph: Any, args: tuple[Any, ...], path: Path, opset: int, input_names: Sequence[str]
) -> None:
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes["embeddings"] = {0: "batch"}
    try:
        with warnings.catch_warnings():
            # TracerWarnings about Python branches are expected: the padded trace input fixes them.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=list(input_names),
                output_names=["embeddings"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Exporter messages can carry a whole graph dump after the first sentence.
        text = text.split(" [Caused by")[0][:300]
        if (
            "opset" in str(exc).lower()
            or "not supported" in str(exc).lower()
            or "Unsupported" in type(exc).__name__
        ):
            raise OnnxExportError(
                f"--opset {opset} is too old for an operator this model needs ({text}) — use --opset "
                f"{DEFAULT_OPSET} or newer"
            ) from exc
        raise OnnxExportError(
            f"torch.onnx.export failed: {text} — rerun with --debug for the traceback"
        ) from exc


def _graph_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def _save(model_proto: Any, path: Path, external: bool) -> None:
    """Write an ONNX ModelProto, with all weights in one external file when ``external``."""
    import onnx

    for f in path.parent.iterdir():  # drop stale external tensors from an earlier save
        if f.is_file() and f != path and f.suffix not in (".json",):
            f.unlink()
    if external:
        onnx.save_model(
            model_proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model_proto, str(path))


def _to_fp16(path: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(path))
    # int64 token ids in, float32 embeddings out: callers never see the internal precision.
    proto16 = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=external)
    _save(proto16, path, external)


# int8 weights in blocks of this many input features, each block with its own scale (see _quantize_int8).
INT8_BLOCK_SIZE = 32


def _quantize_int8(src: Path, dst: Path, external: bool) -> None:
    """Weight-only int8: each MatMul weight in blocks of 32 with a scale each (``MatMulNBits``, bits=8).

    Why not ``quantize_dynamic`` (int8 weights per channel, activations quantised per *tensor* at run
    time): measured on SmolLM2-135M (bidirectional, 30 layers) on an AVX2 CPU without VNNI, it gave a
    worst cosine of -0.40 (mean 0.02) — the u8×s8 kernels saturate their 16-bit sums — and still 0.73
    (mean 0.94) with ``reduce_range``, 0.73 / 0.97 keeping ``down_proj`` in fp32, 0.61 / 0.92 per-tensor
    and 0.68 / 0.93 with uint8 weights: one scale for a whole activation tensor cannot cover a decoder's
    outlier channels. Block-wise int8 weights with activations quantised per block inside the kernel
    (``accuracy_level=4``) reach 0.983 / 0.998 there. Embedding tables stay float (Gather is not
    quantised).
    """
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # The quantizer logs every skipped node at INFO level on its own logger, and tips on the root one.
    quiet = [logging.getLogger(), logging.getLogger(nbits.__name__)]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = nbits.DefaultWeightOnlyQuantConfig(
                block_size=INT8_BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=8
            )
            quantizer = nbits.MatMulNBitsQuantizer(
                onnx.load(str(src)),
                bits=8,
                block_size=INT8_BLOCK_SIZE,
                is_symmetric=True,
                accuracy_level=4,
                algo_config=config,
            )
            quantizer.process()
    except (TypeError, ValueError, AssertionError, NotImplementedError) as exc:
        import onnxruntime

        raise OnnxExportError(
            f"--quantize int8: onnxruntime {onnxruntime.__version__} cannot write 8-bit MatMulNBits ({exc}) — "
            "upgrade it (pip install -U onnxruntime; tested with 1.24 and 1.32)"
        ) from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    _save(quantizer.model.model, dst, external)


def export_onnx(
    model: str | os.PathLike[str] | BiEncoder,
    output: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    max_length: int | None = None,
    verify: bool = True,
    min_cosine: float | None = None,
    texts: Sequence[str] | None = None,
    eval_set: SmallEvalSet | None = None,
    eval_budget_s: float | None = NDCG_BUDGET_S,
    external_data: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a bi-encoder to an ONNX folder and verify it against PyTorch.

    Args:
        model: a saved bi-encoder (folder, LoRA adapter folder, hub id or short name) or a loaded
            ``BiEncoder``. LoRA adapters are merged into the weights first (a loaded model is copied,
            not changed).
        output: the export folder; created, or replaced when it holds an earlier export.
        dtype: "fp32" or "fp16" (weights and compute inside the graph; inputs/outputs stay int64/float32).
        quantize: "int8" for dynamic int8 quantisation of the fp32 graph, or None.
        opset: ONNX opset (17 by default).
        max_length: tokens per text saved in ``embedtune.json`` (default: the model's setting).
        verify: compare PyTorch and ONNX Runtime on padded batches (both padding sides) and fail, writing
            nothing, when the worst cosine falls below the gate (``verify.MIN_COSINE``: fp32 0.9999,
            fp16 0.999, int8 0.95).
        min_cosine: override the gate (any dtype, int8 included).
        texts: verification texts (default: a built-in set of mixed lengths).
        eval_set: a small BEIR slice for the int8 NDCG@10 comparison (see ``verify.small_beir_slice``).
        eval_budget_s: stop the NDCG comparison after this many seconds and score the documents encoded
            so far (None: no limit).
        external_data: force (True) or forbid (False) external weights; default: only over 2 GB.
        log: where progress lines go (default: the logger).

    Returns:
        An :class:`ExportResult` with the verification figures.

    Raises:
        ModelLoadError: ``model`` is not a model.
        OnnxExportError: bad options, an opset too old for an operator, an unusable output folder.
        VerificationError: the export does not reproduce the PyTorch embeddings.
        MissingExtraError: ``onnx``/``onnxruntime`` are not installed, or onnxruntime is older than
            1.24 for ``quantize="int8"``.
    """
    require_onnx()
    say = log or logger.info
    started = time.perf_counter()
    _check_options(dtype, quantize, opset)
    if quantize == "int8":
        require_int8()  # before the fp32 export, not after it
    output = Path(output).expanduser()
    _prepare_output(output)

    from embedtune.models.biencoder import BiEncoder

    bienc = _load_model(model, max_length)
    if isinstance(model, BiEncoder) and (
        hasattr(model.backbone, "merge_and_unload") or next(model.parameters()).dtype != torch.float32
    ):
        bienc = copy.deepcopy(model)  # merging/casting changes a model: never do it to the caller's object
    bienc = bienc.float()
    settings = bienc.settings
    if max_length is not None:  # a local copy: the caller's model keeps its own settings
        settings = EncoderSettings(**{**settings.__dict__, "max_length": int(max_length)})
    with_pooling_mask = not settings.pool_instruction
    input_names = (
        ("input_ids", "attention_mask", "pooling_mask")
        if with_pooling_mask
        else ("input_ids", "attention_mask")
    )

    batches = verification_batches(bienc.tokenizer, settings, texts or VERIFY_TEXTS) if verify else []
    reference: list[Any] = []
    if verify and hasattr(bienc.backbone, "merge_and_unload"):
        # Reference embeddings from the unmerged LoRA model, so the check also proves the merge.
        reference = embed_batches(bienc, batches)
    merged = _merge_lora(bienc)
    if merged:
        say("merged the LoRA adapter into the base weights")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}-export-", dir=output.parent))
    try:
        fp32_dir = work / "fp32"
        fp32_dir.mkdir()
        fp32_path = fp32_dir / ONNX_FILE
        t0 = time.perf_counter()
        # The exporter restores the wrapper's train/eval mode on the whole tree afterwards: a fresh
        # wrapper is in train mode and would switch the caller's model to training (dropout on).
        with preserved_modes(bienc), torch.no_grad():
            _torch_export(
                EmbeddingGraph(bienc, with_pooling_mask=with_pooling_mask).eval(),
                _trace_inputs(bienc, with_pooling_mask),
                fp32_path,
                opset,
                input_names,
            )
        size = _graph_bytes(fp32_path)
        external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
        if external or len(list(fp32_dir.iterdir())) > 1:
            import onnx

            # The TorchScript exporter scatters >2 GB weights over many files; gather them into one.
            _save(onnx.load(str(fp32_path)), fp32_path, external)
        say(
            f"exported {ONNX_FILE} (opset {opset}, {size / 2**20:.1f} MiB{', external data' if external else ''}) in {time.perf_counter() - t0:.1f} s"
        )

        final_dir = work / "final"
        final_dir.mkdir()
        final_path = final_dir / ONNX_FILE
        result = ExportResult(
            folder=output,
            dtype=dtype,
            quantize=quantize,
            opset=opset,
            inputs=input_names,
            external_data=external,
        )
        if quantize == "int8":
            _quantize_int8(fp32_path, final_path, external)
        else:
            for f in fp32_dir.iterdir():
                shutil.copy2(f, final_dir / f.name)
            if dtype == "fp16":
                _to_fp16(final_path, external)

        # Tokenizer + settings beside the graph: the folder is all an inference user needs.
        bienc.tokenizer.padding_side = settings.padding_side
        bienc.tokenizer.save_pretrained(str(final_dir))
        source = {
            **settings.source,
            "onnx": {
                **result.to_dict(),
                "dim": bienc.dim,
                "exporter": f"torch {torch.__version__} (TorchScript)",
            },
        }
        if merged:
            source["lora_merged"] = True
        final_settings = EncoderSettings(**{**settings.__dict__, "source": source})
        final_settings.save(final_dir)

        if verify:
            if not reference:  # computed after the export so that a failing export fails fast
                reference = embed_batches(bienc, batches)
            threshold = min_cosine if min_cosine is not None else MIN_COSINE[quantize or dtype]
            result.min_cosine = threshold
            if quantize is not None:
                result.fp32_parity = compare(
                    reference,
                    embed_batches(_session(fp32_dir, final_settings, bienc.tokenizer), batches),
                    batches,
                )
                say(result.fp32_parity.line("verify fp32 graph (before int8)"))
                # The fp32 graph is held to the fp32 gate (a lower --min-cosine lowers it too).
                _fail_below(result.fp32_parity, min(MIN_COSINE["fp32"], threshold), "fp32")
            onnx_enc = _session(final_dir, final_settings, bienc.tokenizer)
            result.parity = compare(reference, embed_batches(onnx_enc, batches), batches)
            label = f"verify {quantize or dtype}"
            say(result.parity.line(label) + f" (gate {threshold})")
            _fail_below(result.parity, threshold, quantize or dtype, gate_given=min_cosine is not None)
            if quantize is not None and eval_set is not None:
                fp32_enc = _session(fp32_dir, final_settings, bienc.tokenizer)
                length = min(settings.max_length, NDCG_MAX_LENGTH)
                say(
                    f"NDCG@10 check on {eval_set.name}: encoding {len(eval_set.doc_texts)} documents with the "
                    f"fp32 and {quantize} graphs (budget {eval_budget_s or 'none'} s)"
                )
                cmp = compare_ndcg(
                    fp32_enc, onnx_enc, eval_set, max_length=length, budget_s=eval_budget_s, log=say
                )
                result.ndcg = {"fp32": cmp.reference, quantize: cmp.candidate, "delta": cmp.delta}
                result.ndcg_slice = {
                    "name": eval_set.name,
                    "queries": cmp.queries,
                    "documents": cmp.documents,
                    "total_documents": cmp.total_documents,
                    "seconds": round(cmp.seconds, 1),
                }
                cover = "" if cmp.complete else f", first {cmp.documents} of {cmp.total_documents} documents"
                say(
                    f"NDCG@10 on {eval_set.name}{cover}: fp32 {cmp.reference:.4f}, {quantize} "
                    f"{cmp.candidate:.4f} (change {cmp.delta:+.4f})"
                )
            elif quantize is not None:
                say("NDCG@10 check skipped: no evaluation data (pass --eval-data BEIR_FOLDER)")
            # Record what was measured, in the folder itself.
            final_settings.source["onnx"].update(
                {
                    k: v
                    for k, v in result.to_dict().items()
                    if k in ("verification", "fp32_verification", "ndcg@10", "ndcg_slice", "min_cosine_gate")
                }
            )
            final_settings.save(final_dir)

        _install(final_dir, output)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _session(folder: Path, settings: EncoderSettings, tokenizer: Any) -> OnnxBiEncoder:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    return OnnxBiEncoder(session, tokenizer, settings, folder)


def _fail_below(report: ParityReport, threshold: float, label: str, *, gate_given: bool = True) -> None:
    if report.min_cosine >= threshold:
        return
    if label == "int8":
        how = (
            "pass a lower --min-cosine to accept it" if gate_given else f"--min-cosine (default {threshold})"
        )
        raise VerificationError(
            f"the int8 ONNX model is too far from the PyTorch embeddings: worst cosine "
            f"{report.min_cosine:.6f} < gate {threshold} (mean {report.mean_cosine:.6f}). Nothing was written. "
            f"Export fp32 (drop --quantize), or accept the loss with {how}"
            + ("" if gate_given else f", e.g. --min-cosine {max(0.0, report.min_cosine - 0.005):.2f}")
        )
    if report.min_cosine < threshold:
        raise VerificationError(
            f"the {label} ONNX model does not reproduce the PyTorch embeddings: min cosine "
            f"{report.min_cosine:.6f} < {threshold} (max |diff| {report.max_abs_diff:.2e}). Nothing was "
            "written. Try another --opset, or --dtype fp32; --no-verify writes the files anyway for inspection"
        )


def _install(src: Path, output: Path) -> None:
    """Move the finished export to ``output``, replacing an earlier export there only once it is in.

    The whole folder is swapped (``embedtune._atomic.install_folder``): no stale external data of the
    earlier export survives, and a crash at any step leaves the earlier export intact.
    """
    install_folder(src, output)


def describe(result: ExportResult) -> str:
    """A one-paragraph summary of an export for the CLI."""
    files = sorted(p.name for p in result.folder.iterdir())
    info = json.dumps({"inputs": list(result.inputs), "dtype": result.dtype, "quantize": result.quantize})
    return f"wrote {result.folder} ({', '.join(files)}) {info} in {result.seconds:.1f} s"
