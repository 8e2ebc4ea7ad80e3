"""AVIS policy files (GGUF, general.architecture = "avis-policy") from the command line.

The writer and reader live in avis_llamacpp.policy (`save_policy` / `load_policy`) so an installed package can
use them; this is a thin tool around them:

    python -m convert.policy_file show policy.gguf [--model M --mmproj P]   # metadata; check against a model
    python -m convert.policy_file fit OUT_DIR/records.jsonl --out policy.gguf [--lambda L | --budget B]
        # refit predictor + K map from calibration records without running the model again
    python -m convert.policy_file set-tau policy.gguf --calibration OUT_DIR/tau.json --out new.gguf
        # the same policy pruning at the tau `avis calibrate` chose for the model (tau.json), recorded as calibrated

File layout (format version 1):
  KV   general.architecture = "avis-policy", general.name
       avis.policy.version (u32), avis.policy.feature.{version,n_embd,count} (u32)
       avis.policy.k_map.bounds (f64[n_bins + 1], from 0 to 1), avis.policy.k_map.ks (u32[n_bins])
       avis.policy.pruning ("tau" | "ratio" | "none"), avis.policy.tau / avis.policy.ratio (f64)
       avis.policy.tau.calibration (JSON str, optional: how tau was chosen for the model; absent in older files,
       whose tau is then one nobody calibrated)
       avis.policy.predictor.{kind,activation} (str), .n_layers (u32), .pca (bool)
       avis.policy.{model_id,model_file,mmproj_file,created,creator} (str), avis.policy.info (JSON str)
  F64  predictor.scaler.{mean,scale} [n_features], predictor.pca.{mean [n_features], components [c, n_features]}
       (when .pca), predictor.layer.{i}.weight [in, out], predictor.layer.{i}.bias [out]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from avis_llamacpp.calibrate import REPORT_FILE, fit_policy, format_report, load_records
from avis_llamacpp.errors import AVISError
from avis_llamacpp.policy import load_policy, read_policy_metadata

logger = logging.getLogger(__name__)


def _show(args: argparse.Namespace) -> int:
    """Print a policy file's metadata; with --model/--mmproj also check it against that model."""
    meta = read_policy_metadata(args.path)
    if args.model:
        from avis_llamacpp.pipeline import VLM

        with VLM(args.model, args.mmproj, n_ctx=512, n_seq_max=1) as vlm:
            pol = load_policy(args.path, vlm)
        meta["check"] = f"ok for {Path(args.model).name}: {pol}"
    else:
        meta["policy"] = str(load_policy(args.path))
    print(json.dumps(meta, indent=2, default=str))
    return 0


def _fit(args: argparse.Namespace) -> int:
    """Refit a policy from records.jsonl and write it (plus a report next to it)."""
    records = load_records(args.records)
    policy, report = fit_policy(records, lambda_=args.lambda_, budget=args.budget, seed=args.seed, cost=args.cost)
    out = Path(args.out)
    policy.save(out)
    report_path = Path(args.report) if args.report else out.with_name(REPORT_FILE)
    report_path.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"wrote {out} and {report_path}")
    return 0


def _set_tau(args: argparse.Namespace) -> int:
    """Write a policy pruning at a calibrated tau (from tau.json, as `avis calibrate` writes it)."""
    from avis_llamacpp.errors import InvalidArgumentError

    try:
        doc = json.loads(Path(args.calibration).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"{args.calibration}: not a tau.json ({e})") from None
    cal = doc.get("calibration", doc) if isinstance(doc, dict) else None
    if not isinstance(cal, dict) or cal.get("tau") is None:
        raise InvalidArgumentError(f"{args.calibration}: no calibrated tau in it")
    policy = load_policy(args.path).with_tau(float(cal["tau"]), cal)
    policy.save(args.out)
    print(f"wrote {args.out}: {policy}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m convert.policy_file", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print a policy file's metadata")
    s.add_argument("path")
    s.add_argument("--model", help="text model GGUF to check the policy against")
    s.add_argument("--mmproj", help="its mmproj GGUF")
    s.set_defaults(func=_show)
    f = sub.add_parser("fit", help="fit a policy from calibration records")
    f.add_argument("records", help="records.jsonl (or the calibration output folder)")
    f.add_argument("--out", required=True, help="policy GGUF to write")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--lambda", dest="lambda_", type=float, default=None, help="accuracy - lambda * compute")
    g.add_argument("--budget", type=float, default=None, help="best accuracy with mean compute <= budget")
    f.add_argument("--cost", choices=("auto", "k", "flops"), default="auto")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--report", default=None, help="report JSON path (default: report.json next to --out)")
    f.set_defaults(func=_fit)
    t = sub.add_parser("set-tau", help="write a policy with the tau `avis calibrate` chose (tau.json)")
    t.add_argument("path", help="policy GGUF to start from")
    t.add_argument("--calibration", required=True, help="tau.json from `avis calibrate` (its 'calibration')")
    t.add_argument("--out", required=True, help="policy GGUF to write (may be the same path)")
    t.set_defaults(func=_set_tau)
    args = p.parse_args(argv)
    if args.command == "show" and bool(args.model) != bool(args.mmproj):
        p.error("--model and --mmproj go together")
    try:
        return int(args.func(args) or 0)
    except AVISError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
