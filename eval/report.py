"""report.json and report.md from the suites' result dicts (see common.py for their shape)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# Eval report: {report['target']}", "",
             f"- created: {report['created']}", f"- model: {report['model']}", ""]
    for res in report["suites"]:
        lines += [f"## {res['suite']}", ""]
        if "seconds" in res:
            lines += [f"time: {res['seconds']:.1f} s", ""]
        if res.get("error"):
            lines += [f"**failed**: {res['error']}", ""]
            continue
        if res.get("settings"):
            lines += ["settings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in res["settings"].items()), ""]
        if res.get("metrics"):
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in res["metrics"].items()] + [""]
        for t in res.get("tables", []):
            lines += [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                      "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t["rows"]] + [""]
        for p in res.get("plots", []):
            lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def write_report(out: Path, target: str, model_info: Dict[str, Any], results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Write out/report.json and out/report.md; returns the report dict."""
    out.mkdir(parents=True, exist_ok=True)
    report = _clean({"target": target, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "model": model_info, "suites": results})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return report
