"""README's GPU table, generated from a ``gpu-report`` run (``python -m zvl_ds.bench gpu-table [DIR] [--write]``).

The table sits between ``<!-- gpu-table:start -->`` and ``<!-- gpu-table:end -->`` in README.md and is made from
the report committed as ``docs/gpu-report.json`` only: it names the GPU, torch and the commit measured, and says
"not measured" for every figure no run has produced (a test keeps README and the committed report in step).
``--write DIR`` copies ``DIR/report.json`` there and rewrites the table; a smoke run's report is refused.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Mapping, Optional

from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.base.errors import UserError

MARKER = "gpu-table"
README = "README.md"
COMMITTED_REPORT = os.path.join("docs", "gpu-report.json")
NOT_MEASURED = "not measured"
_GIB = 2 ** 30


def _ok(report: Optional[Mapping], stage: str) -> Optional[Mapping]:
    record = (report or {}).get("stages", {}).get(stage)
    return record["result"] if record and record["status"] == "ok" and record.get("result") else None


def _missing(report: Optional[Mapping], stage: str) -> str:
    record = (report or {}).get("stages", {}).get(stage)
    return NOT_MEASURED + (f" (stage `{stage}`: {record['status']})" if record else "")


def _percent(value: Optional[float]) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a (unknown peak FLOP/s)"


def _dga_cell(result: Mapping) -> str:
    cells = []
    for name, label in (("rows", "row-chunked loss"), ("tiled", "tiled loss")):
        row = result["variants"][name]
        cells.append(f"{label}: {row['samples_per_sec']:,.0f} samples/s, MFU {_percent(row['mfu_useful'])} useful / "
                     f"{_percent(row['mfu_hardware'])} with the recompute, peak {row['peak_memory_bytes'] / _GIB:.1f} GiB")
    return f"chunk {result['chunk']}; " + "; ".join(cells)


def _rows(report: Optional[Mapping]) -> List[List[str]]:
    rows = []
    sizes = (report or {}).get("sizes") or {}  # a report's own sizes; the GPU run's before any report exists
    towers = "tiny smoke towers" if (report or {}).get("smoke") else "vit_b16_bert_base"
    setting = f"{towers} {sizes.get('precision', 'bf16')}"
    dga, compiled = _ok(report, "dga"), _ok(report, "dga_compiled")
    rows.append([f"DGA, global batch {sizes.get('global_batch', 16384):,}, {setting}, eager",
                 _dga_cell(dga) if dga else _missing(report, "dga")])
    rows.append(["the same with `model.compile=default`",
                 _dga_cell(compiled) if compiled else _missing(report, "dga_compiled")])
    profile = _ok(report, "profile")
    if profile:
        split = profile["ms_per_step"]
        parts = [f"{label} {split[key]:,.0f}" for key, label in (
            ("pass1", "pass 1"), ("loss", "loss"), ("pass2", "pass 2"), ("optimizer", "optimizer"),
            ("host_to_device", "host->device"), ("deepspeed", "DeepSpeed"), ("host_other", "host"))]
        cell = f"{split['step_wall']:,.0f} ms per step: " + ", ".join(parts) + " ms"
    else:
        cell = _missing(report, "profile")
    rows.append(["where one step's time goes", cell])
    openclip = _ok(report, "openclip")
    if openclip:
        ratio = openclip["ratio_zvl_ds_to_openclip"]
        cell = (f"{openclip['samples_per_sec']:,.0f} samples/s (`--accum-freq {openclip['accum_freq']}`, "
                f"{openclip['precision']}); zvl_ds / OpenCLIP = " + (f"{ratio:.2f}x" if ratio else NOT_MEASURED))
    else:
        cell = _missing(report, "openclip")
    rows.append(["OpenCLIP's `open_clip_train`, same towers and batch", cell])
    big = _ok(report, "big_step")
    if big and not big["applied"]:
        cell = f"skipped ({big['skip_reason']})"
    elif big:
        device = big["peak_device_memory_bytes"]  # None on a CPU (a smoke run)
        device_text = f"{device / _GIB:.1f} GiB on the GPU" if device is not None else "device memory n/a (CPU)"
        inputs = f"{big['input_bytes'] / _GIB:.1f} GiB of inputs" + (", pinned" if big["inputs_pinned"] else "")
        cell = (f"{big['step_seconds']:,.1f} s, peak {device_text}, host peak "
                f"{big['host_peak_rss_bytes'] / _GIB:.1f} GiB ({inputs}); loss {big['loss']:.4f}, accuracy i2t "
                f"{big['i2t_acc']:.4f} / t2i {big['t2i_acc']:.4f}")
    else:
        cell = _missing(report, "big_step")
    rows.append([f"one exact DGA step at global batch {sizes.get('big_batch', 262144):,}", cell])
    verify = _ok(report, "verify_exactness")
    if verify:
        worst = max((g["relative"] for g in verify["groups"].values()), default=float("nan"))
        cell = (f"{'PASS' if verify['passed'] else 'FAIL'} at batch {verify['global_batch']} (largest relative "
                f"difference {worst:.1e}, tolerance {verify['tolerance']:.0e})")
    else:
        cell = _missing(report, "verify_exactness")
    rows.append(["`verify_exactness`, same configuration", cell])
    return rows


def render_table(report: Optional[Mapping]) -> str:
    """The markdown block between README's markers, from a report (None: no GPU run yet)."""
    if report is None:
        head = f"No GPU run yet: every figure is {NOT_MEASURED}."
    else:
        head = (f"Measured on {report.get('gpu') or 'no GPU'} ({report.get('cpu')}), torch {report.get('torch')} "
                f"(CUDA {report.get('cuda')}), commit `{report.get('commit')}`, {report.get('started')}.")
    lines = [head, "", "| measurement | result |", "| --- | --- |"]
    lines += [f"| {name} | {cell} |" for name, cell in _rows(report)]
    return "\n".join(lines) + "\n"


def load_report(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"no gpu-report found at {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not a gpu-report (invalid JSON: {error})") from None


def committed_report(root: str) -> Optional[Dict]:
    path = os.path.join(root, COMMITTED_REPORT)
    return load_report(path) if os.path.exists(path) else None


def replace_block(text: str, block: str, where: str) -> str:
    pattern = re.compile(rf"(<!-- {MARKER}:start -->\n).*?(<!-- {MARKER}:end -->)", re.S)
    if len(pattern.findall(text)) != 1:
        raise UserError(f"{where} must hold <!-- {MARKER}:start --> and <!-- {MARKER}:end --> exactly once")
    return pattern.sub(lambda match: match.group(1) + block + match.group(2), text)


def readme_block(text: str) -> str:
    """The block currently between README's markers."""
    match = re.search(rf"<!-- {MARKER}:start -->\n(.*?)<!-- {MARKER}:end -->", text, re.S)
    if not match:
        raise UserError(f"README.md has no <!-- {MARKER}:start --> ... <!-- {MARKER}:end --> block")
    return match.group(1)


def write_table(root: str, report_dir: Optional[str]) -> str:
    """Copy ``report_dir``'s report into ``root``'s docs (when given) and rewrite README's table; returns it."""
    if report_dir is not None:
        report = load_report(os.path.join(report_dir, "report.json"))
        if report.get("smoke") or not report.get("gpu"):
            raise UserError(f"{report_dir}: a smoke run's (or a GPU-less run's) report is not a GPU measurement")
        write_text_atomic(os.path.join(root, COMMITTED_REPORT), json.dumps(report, indent=1) + "\n")
    block = render_table(committed_report(root))
    readme = os.path.join(root, README)
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    write_text_atomic(readme, replace_block(text, block, readme))
    return block


def main_gpu_table(report_dir: Optional[str], write: bool, root: str = ".") -> int:
    """``gpu-table``: print the table of ``report_dir`` (default: the committed report); ``--write``: store it."""
    if write:
        if not os.path.isfile(os.path.join(root, README)):
            raise UserError("gpu-table --write runs in the repository root (README.md not found here)")
        print(write_table(root, report_dir), end="")
        return 0
    report = load_report(os.path.join(report_dir, "report.json")) if report_dir else committed_report(root)
    print(render_table(report), end="")
    return 0
