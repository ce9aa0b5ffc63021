"""Side-by-side speed of U-DiT and DiT: training step, inference forward, sampling.

    python bench/bench.py                                   # CPU: U-DiT-S vs DiT-S/2, fp32, batch 8
    python bench/bench.py --models U-DiT-B U-DiT-L DiT-B/2 DiT-L/2 DiT-XL/2 --batch-size 32 \\
        --precision bf16 --cuda-graph --sampling             # GPU
    python bench/bench.py --models U-DiT-S --objectives ddpm flow   # the training objectives side by side
    python bench/bench.py --models U-DiT-B DiT-B/2 --alignment       # with and without REPA / U-REPA

Models are measured in one process, alternating between them round by round, so that
they see the same machine state; each figure is the median over rounds. The ceiling is
a large matrix product in the same precision, measured in the same run; utilisation is
achieved GFLOP/s over that ceiling (training counts forward + backward as 3x the
forward MACs). "ops/step" counts the operators one eager training step dispatches
(views excluded): each launches at least one kernel on a GPU, so a step bound by
launches rather than arithmetic grows with it (and with the host-side cost of each call,
views included). Prints a table and writes JSON (--json).

--alignment adds each model trained with representation alignment (udit/alignment.py:
REPA at DiT's default block, U-REPA at U-DiT's middle stage with the manifold term) against
a DINOv2-B/14 of random weights (the same cost as the real one): the step then includes
the encoder's forward on the batch's images at 224 px (for 256), the projector and the
alignment losses. GMACs and utilisation count the diffusion model only. Each model is
then measured beside its aligned case, one pair at a time (alternating within the pair),
so that memory holds two cases rather than all of them.
"""

import json
import platform
import statistics
import sys
import time
from contextlib import ExitStack, nullcontext
from copy import deepcopy
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion import create_diffusion  # noqa: E402
from models import (DiT_models, U_DiT, cache_rope_tables, capture_block_outputs, compile_blocks,  # noqa: E402
                    count_params, create_model, model_report)
from udit.alignment import MANIFOLD_COEFF, AlignedObjective, Aligner, encoder_targets  # noqa: E402
from udit.cuda_graphs import GraphedForward, capture  # noqa: E402
from udit.distributed import configure_matmul_precision  # noqa: E402
from udit.encoders import DINOV2, PatchEncoder, dinov2_resolution  # noqa: E402
from udit.objectives import OBJECTIVES, create_objective  # noqa: E402
from udit.cli import ArgumentParser, non_negative_int, number, output_file, positive_int  # noqa: E402

SAME_MACS = {"U-DiT-S": "DiT-S/2", "U-DiT-B": "DiT-B/2", "U-DiT-L": "DiT-L/2"}
ALIGNED = (" + U-REPA", " + REPA")  # name suffixes of the aligned cases
BENCH_ENCODER = "dinov2-vitb14"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compiled(model, how, entry="forward"):
    """model.<entry> as timed: eager, with every block compiled in place, or compiled as a whole."""
    if how == "blocks":
        compile_blocks(model)
    elif how == "model":
        cache_rope_tables(model)
    fn = getattr(model, entry)
    return torch.compile(fn) if how == "model" else fn


class _OperatorCounter(TorchDispatchMode):
    # Views and bare allocations launch no kernel.
    NO_KERNEL = {"empty", "empty_strided", "detach", "lift_fresh", "_unsafe_view"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name.split("::")[-1] not in self.NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(fn):
    """Number of compute operators fn() dispatches (forward, backward and optimizer alike)."""
    with _OperatorCounter() as counter:
        fn()
    return counter.count


KERNEL_KINDS = ("matmul", "conv", "attention", "optimizer")
MATMUL_OPERATORS = {"mm", "addmm", "bmm", "baddbmm", "addmv", "addmv_", "_addmm_activation"}


def kernel_kind(operator):
    """The kind of an ATen operator's kernels (name without 'aten::'): one of KERNEL_KINDS or 'other'."""
    if operator in MATMUL_OPERATORS:
        return "matmul"
    for kind, part in (("conv", "convolution"), ("conv", "conv_depthwise"), ("conv", "slow_conv"),
                       ("attention", "attention"), ("optimizer", "adam")):
        if part in operator:
            return kind
    return "other"


def kernel_time_breakdown(fn, device):
    """Seconds of one fn() spent in each kind of kernel: {'matmul', 'conv', 'attention', 'optimizer', 'other'}.

    Summed over ATen operators' own time (their kernels' GPU time on CUDA, their CPU
    time otherwise), so Python and dispatch overhead outside operators is not counted:
    all but 'other' is what the step needs even if every element-wise pass and copy
    were free.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    seconds = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        own_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        seconds[kernel_kind(event.key[len("aten::"):])] += own_us / 1e6
    return seconds


def gemm_ceiling(device, dtype, size, repeats=5):
    """GFLOP/s of a size x size matrix product: the device's attainable peak in this precision."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size ** 3 / seconds / 1e9


class Case:
    """One model with its optimizer and inputs; step() and infer() run one iteration each.

    With --cuda-graph, graph() records one whole training step (forward, backward, AdamW)
    and one inference forward (on an eval-mode copy, whose folded FFN weights stay put)
    after the eager warm-up; step() and infer() then replay them.
    """

    def __init__(self, name, args, device, objective="ddpm", align=False):
        self.name = name if objective == "ddpm" else f"{name} {objective}"
        self.objective = create_objective({"objective": objective})
        torch.manual_seed(0)
        self.model = create_model(name, input_size=args.latent_size,
                                  learn_sigma=self.objective.learn_sigma).to(device)
        self.params = count_params(self.model)
        self.gmacs = model_report([name], args.latent_size)[0][3]  # folded, as the paper counts
        n = args.batch_size
        self.encoder, self.hooks = None, ExitStack()
        if align:
            self.name += ALIGNED[0] if isinstance(self.model, U_DiT) else ALIGNED[1]
            self.align(args, device)
        self.trained = [*self.model.parameters(), *(self.aligner.parameters() if self.encoder else ())]
        self.opt = torch.optim.AdamW(self.trained, lr=1e-4, fused=True,
                                     capturable=args.cuda_graph and device.type == "cuda")
        self.x = torch.randn(n, 4, args.latent_size, args.latent_size, device=device)
        self.y = torch.randint(0, 1000, (n,), device=device)
        self.t = self.objective.sample_time(n, device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not args.cuda_graph)
                         if args.precision == "bf16" else nullcontext())
        self.train_fn = compiled(self.model, args.compile)
        self.infer_fn = self.train_fn
        self.times = {"train": [], "infer": []}
        self.peak_memory = None
        self.graphs = None
        self.operators = None
        self.breakdown = {}

    def align(self, args, device):
        """Train with alignment against a random DINOv2-B at REPA's resolution; hooks before compiling."""
        import timm
        resolution = dinov2_resolution(args.image_size)
        vit = timm.create_model(DINOV2[BENCH_ENCODER], pretrained=False, img_size=resolution, num_classes=0)
        self.encoder = PatchEncoder(vit, resolution, BENCH_ENCODER).to(device)
        family = "U-DiT" if isinstance(self.model, U_DiT) else "DiT"
        self.aligner = Aligner(self.model, self.encoder.grid, self.encoder.width,
                               manifold_coeff=MANIFOLD_COEFF[family]).to(device)
        captured = self.hooks.enter_context(capture_block_outputs(self.model, [self.aligner.block_name]))
        # The projection runs inside the step's autocast region (eager_step enters it).
        self.objective = AlignedObjective(self.objective, self.aligner, captured, nullcontext)
        self.images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1

    def step(self):
        if self.graphs:
            return self.graphs["train"].replay()
        self.eager_step()

    def eager_step(self):
        with self.autocast:
            features = {"target": encoder_targets(self.encoder, self.images, nullcontext)} if self.encoder else {}
            loss = self.objective.losses(self.train_fn, self.x, self.t, self.y, **features)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def infer(self):
        if self.graphs:
            return self.graphs["infer"].replay()
        self.eager_infer()

    @torch.no_grad()
    def eager_infer(self):
        with self.autocast:
            self.infer_fn(self.x, self.t, self.y)

    def set_mode(self, training):
        """Switch mode outside the timed region; in eval, fold the FFNs once (as sampling does)."""
        if self.graphs:
            return
        self.model.train(training)
        if not training:
            self.infer()

    def graph(self):
        self.model.train()
        train_graph = capture(self.eager_step)
        self.infer_fn = deepcopy(self.model).eval()
        self.graphs = {"train": train_graph, "infer": capture(self.eager_infer)}

    def resident_bytes(self):
        """Bytes of this model's parameters, gradients and optimizer state."""
        tensors = [p for p in self.trained] + [p.grad for p in self.trained]
        tensors += [v for state in self.opt.state.values() for v in state.values()]
        return sum(x.numel() * x.element_size() for x in tensors if torch.is_tensor(x))


def sampling_rate(name, args, device):
    """Images/s for `--sampling-steps` guided DDPM steps plus the SD-VAE decode (random weights, same cost).

    A short loop first warms up (and compiles) every shape; the full loop is then timed once.
    """
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    model = create_model(name, input_size=args.latent_size).to(device).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).to(device).eval()
    forward = compiled(model, args.compile, "forward_with_cfg")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    n = args.sampling_batch_size or args.batch_size
    shape = (2 * n, 4, args.latent_size, args.latent_size)
    z = torch.randn(n, 4, args.latent_size, args.latent_size, device=device)
    y = torch.cat([torch.randint(0, 1000, (n,), device=device), torch.full((n,), 1000, device=device)])

    def model_fn(x, t, **kw):
        with autocast:
            return forward(x, t, **kw).float()
    if args.cuda_graph:
        model_fn = GraphedForward(model_fn)

    def run(steps):
        diffusion = create_diffusion(str(steps))
        with torch.no_grad():
            out = diffusion.p_sample_loop(model_fn, shape, torch.cat([z, z]), clip_denoised=False,
                                          model_kwargs={"y": y, "cfg_scale": 1.5}, device=device)
            with autocast:
                vae.decode(out[:n] / 0.18215)
    run(2)
    return n / timed(lambda: run(args.sampling_steps), device)


def write_json(path, results):
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


def comparisons(name, models, pairs=False):
    """The measured models `name` is compared with: the DiT with the same MACs, and DiT-XL/2; a flow
    case with the same model trained as the paper does; an aligned case with the same model unaligned.
    pairs (--alignment): only the latter, the only cases measured side by side (case_groups)."""
    for suffix in ALIGNED:
        if name.endswith(suffix):
            return [name.removesuffix(suffix)] if name.removesuffix(suffix) in models else []
    if pairs:
        return []
    if name.endswith(" flow"):
        return [name.removesuffix(" flow")] if name.removesuffix(" flow") in models else []
    return [other for other in (SAME_MACS.get(name), "DiT-XL/2") if other in models and other != name]


def print_table(results, args):
    compile_note = {"none": "", "blocks": ", blocks compiled", "model": ", compiled"}[args.compile]
    compile_note += ", CUDA graphs" if args.cuda_graph else ""
    print(f"{results['device']}, torch {results['torch']}, {args.precision}{compile_note}, batch {args.batch_size}, "
          f"{args.image_size} px; GEMM ceiling {results['gemm_ceiling_gflops']:.0f} GFLOP/s")
    print(f"{'model':<18} {'GMACs':>7} {'train s':>9} {'steps/s':>8} {'infer s':>9} {'GFLOP/s':>8} {'util':>6} "
          f"{'GiB':>6} {'ops/step':>8}  step-time ratios (train / infer)")
    models = results["models"]
    for name, r in models.items():
        ratios = [f"vs {other}: {r['train_step_s'] / models[other]['train_step_s']:.2f}x / "
                  f"{r['infer_s'] / models[other]['infer_s']:.2f}x" for other in comparisons(name, models, args.alignment)]
        memory = f"{r['train_peak_memory_gib']:.1f}" if r["train_peak_memory_gib"] else "-"
        operators = r["train_ops_per_step"] or "-"
        print(f"{name:<18} {r['gmacs']:>7.2f} {r['train_step_s']:>9.4f} {r['train_steps_per_s']:>8.2f} "
              f"{r['infer_s']:>9.4f} {r['train_gflops']:>8.0f} {r['utilisation']:>6.0%} "
              f"{memory:>6} {operators:>8}  {'; '.join(ratios)}")
    if any(r["train_kernel_seconds"] for r in models.values()):
        print_breakdown(models, args.alignment)
    for name, r in models.items():
        if "sampling_images_per_s" in r:
            print(f"{name:<10} sampling {args.sampling_steps} guided steps + VAE decode: "
                  f"{r['sampling_images_per_s']:.2f} images/s, {args.sampling_images:,} images in "
                  f"{r['sampling_hours']:.2f} h on one device")


def print_breakdown(models, pairs=False):
    """Step time by kernel kind; 'floor' leaves out 'other' (element-wise passes, copies, norms)."""
    kinds = [*KERNEL_KINDS, "other"]
    for mode, step, time_key in (("train", "training step", "train_step_s"), ("infer", "inference forward", "infer_s")):
        print(f"\none profiled eager {step}, ms by kernel kind (operators' own time)")
        print(f"{'model':<10} " + " ".join(f"{kind:>9}" for kind in kinds) + f" {'floor':>9}  floor over the time of")
        for name, r in models.items():
            seconds = r[f"{mode}_kernel_seconds"]
            floor = sum(seconds[kind] for kind in KERNEL_KINDS)
            others = [f"{other}: {floor / models[other][time_key]:.2f}x" for other in comparisons(name, models, pairs)]
            print(f"{name:<10} " + " ".join(f"{seconds[kind] * 1e3:>9.1f}" for kind in kinds)
                  + f" {floor * 1e3:>9.1f}  {'; '.join(others)}")


def build_parser():
    p = ArgumentParser(prog="bench.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", nargs="+", default=["U-DiT-S", "DiT-S/2"], choices=list(DiT_models))
    p.add_argument("--objectives", nargs="+", default=["ddpm"], choices=OBJECTIVES,
                   help="training objectives to measure each model with (flow: C output channels, no VB term)")
    p.add_argument("--alignment", action="store_true",
                   help="also measure each model trained with REPA (DiT) / U-REPA (U-DiT) against a random DINOv2-B")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--image-size", type=number(int, min=8), default=256, help="pixels (latents: / 8)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--compile", nargs="?", const="model", default="none", choices=["none", "blocks", "model"],
                   help="torch.compile each transformer block ('blocks') or the whole model ('model', the default "
                        "of a bare --compile)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step, inference forward and sampling forward from a CUDA graph")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--gemm-size", type=positive_int, default=None, help="default: 2048 on CPU, 8192 on GPU")
    p.add_argument("--sampling", action="store_true", help="also measure 250-step guided sampling with VAE decode")
    p.add_argument("--sampling-steps", type=positive_int, default=250)
    p.add_argument("--sampling-batch-size", type=positive_int, default=None, help="default: --batch-size")
    p.add_argument("--sampling-models", nargs="+", choices=list(DiT_models), help="default: --models")
    p.add_argument("--sampling-images", type=positive_int, default=50_000, help="for the projected hours on one device")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile one eager training step per model: time in matrix products, "
                        "convolutions, attention, the optimizer and all other operators")
    p.add_argument("--json", type=output_file, help="write the results here")
    return p


def case_groups(args):
    """[[(model, objective, aligned)]]: the cases measured together, alternating round by round.

    Without --alignment every case is one group (U-DiT and DiT side by side). With it, each
    model and objective is a group of its plain and its aligned case, measured and freed
    before the next: the ratio that matters is aligned over plain, and all four cases of
    U-DiT-B and DiT-B/2 at once (weights, gradients, AdamW state, two DINOv2-B) reached 17 GB
    resident on the 24 GB development machine.
    """
    cases = [(name, objective, align) for name in args.models for objective in args.objectives
             for align in ((False, True) if args.alignment else (False,))]
    return [cases[i:i + 2] for i in range(0, len(cases), 2)] if args.alignment else [cases]


def measure(cases, args, device):
    """Warm up, count operators (eager), capture graphs (--cuda-graph), then time --rounds rounds, alternating."""
    for _ in range(args.warmup):
        for case in cases:
            case.set_mode(True)
            case.step()
            case.set_mode(False)
    if args.compile == "none":  # compiled code runs fused kernels, not these operators
        for case in cases:
            case.set_mode(True)
            case.operators = count_operators(case.eager_step)
            if args.breakdown:
                case.breakdown["train"] = kernel_time_breakdown(case.eager_step, device)
                case.set_mode(False)
                case.breakdown["infer"] = kernel_time_breakdown(case.eager_infer, device)
    if args.cuda_graph:
        for case in cases:
            case.graph()
    for _ in range(args.rounds):
        for case in cases:
            case.set_mode(True)
            measure_memory = device.type == "cuda" and not args.cuda_graph
            if measure_memory:  # the step's peak above what is resident, plus this model's own state
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            case.times["train"].append(timed(case.step, device))
            if measure_memory:
                peak = torch.cuda.max_memory_allocated(device) - before + case.resident_bytes()
                case.peak_memory = max(case.peak_memory or 0, peak)
        for case in cases:
            case.set_mode(False)
            case.times["infer"].append(timed(case.infer, device))


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.latent_size = args.image_size // 8
    if args.sampling_models and not set(args.sampling_models) <= set(args.models):
        p.error("--sampling-models must be among --models")
    if args.cuda_graph and not torch.cuda.is_available():
        p.error("--cuda-graph needs a CUDA device")
    if args.breakdown and args.compile != "none":
        p.error("--breakdown profiles eager operators; compiled code runs fused kernels instead (drop --compile)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_matmul_precision(args.precision, device)
    gemm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    ceiling = gemm_ceiling(device, gemm_dtype, gemm_size)

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
               "cuda_graph": args.cuda_graph,
               "command": "python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "batch_size": args.batch_size, "image_size": args.image_size,
               "gemm_ceiling_gflops": ceiling, "date": time.strftime("%Y-%m-%d"), "models": {}}
    for group in case_groups(args):
        cases = [Case(name, args, device, objective, align) for name, objective, align in group]
        measure(cases, args, device)
        for case in cases:
            train_s, infer_s = statistics.median(case.times["train"]), statistics.median(case.times["infer"])
            train_gflops = 3 * 2 * case.gmacs * args.batch_size / train_s
            results["models"][case.name] = {
                "params": case.params, "gmacs": case.gmacs, "train_step_s": train_s, "infer_s": infer_s,
                "train_steps_per_s": 1 / train_s, "train_gflops": train_gflops, "utilisation": train_gflops / ceiling,
                "train_peak_memory_gib": case.peak_memory / 2**30 if case.peak_memory else None,
                "train_ops_per_step": case.operators, "train_kernel_seconds": case.breakdown.get("train"),
                "infer_kernel_seconds": case.breakdown.get("infer")}
        del cases
        write_json(args.json, results)
    if args.sampling:
        for name in args.sampling_models or args.models:
            rate = sampling_rate(name, args, device)
            results["models"][name].update(
                sampling_images_per_s=rate, sampling_hours=args.sampling_images / rate / 3600)
            write_json(args.json, results)

    print_table(results, args)
    return results


if __name__ == "__main__":
    main()
