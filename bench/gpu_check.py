"""One call for a lent GPU: correctness on the device, then the speed figures of bench.py.

    python bench/gpu_check.py --out $OUT --golden .golden     # about 5 minutes on an H100

(../shared does not travel to a lent machine: copy shared/golden into an ignored folder
such as .golden and carry it.)

1. The golden vectors (../shared/golden) on the device in fp32: forward (train / eval /
   guided) within the reference tolerance, and the drift of bf16 autocast from fp32.
2. bench.py: U-DiT-B/L against DiT-B/2, L/2, XL/2 in bf16, batch 32, compiled, with
   the 250-step guided sampling rate; results in OUT/gpu_bench.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402
from models import DiT, U_DiT  # noqa: E402


def golden_on_device(device, golden_dir):
    """Max relative error of each golden forward on `device` in fp32, and of bf16 autocast."""
    report = {}
    for kind, cls in (("udit", U_DiT), ("dit", DiT)):
        g = torch.load(golden_dir / f"{kind}_tiny_golden.pt", weights_only=True)
        model = cls(input_size=g["input_size"], num_classes=g["num_classes"], **json.loads(g["config"]))
        model.load_state_dict(g["state_dict"])
        for e in model.label_embedders():
            e.dropout_prob = 0.0
        model.to(device)
        x, t, y = (g[k].to(device) for k in ("x", "t", "y"))

        def rel(out, ref):
            return ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        with torch.no_grad():
            report[f"{kind}_train_fp32"] = rel(model.train()(x, t, y), g["out_train"])
            report[f"{kind}_eval_fp32"] = rel(model.eval()(x, t, y), g["out_eval"])
            xc, tc, yc = (g[k].to(device) for k in ("x_cfg", "t_cfg", "y_cfg"))
            report[f"{kind}_cfg_fp32"] = rel(model.forward_with_cfg(xc, tc, yc, g["cfg_scale"]), g["out_cfg"])
            with torch.autocast(device.type, dtype=torch.bfloat16):
                report[f"{kind}_eval_bf16"] = rel(model(x, t, y), g["out_eval"])
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=".", help="folder for the JSON results")
    p.add_argument("--golden", default=str(ROOT.parent / "shared" / "golden"))
    p.add_argument("--models", nargs="+", default=["U-DiT-B", "U-DiT-L", "DiT-B/2", "DiT-L/2", "DiT-XL/2"])
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    correctness = golden_on_device(device, Path(args.golden))
    print(json.dumps(correctness, indent=2))
    failed = [k for k, v in correctness.items() if "fp32" in k and v > 1e-4]
    (out / "gpu_correctness.json").write_text(json.dumps(correctness, indent=2) + "\n")
    if failed:
        sys.exit(f"golden vectors not reproduced on {device}: {failed}")

    flags = ["--models", *args.models, "--batch-size", "32", "--precision", "bf16", "--sampling",
             "--rounds", "5", "--json", str(out / "gpu_bench.json")]
    bench.main(flags if args.no_compile else [*flags, "--compile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
