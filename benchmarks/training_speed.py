"""P3: PGD-10 adversarial-training throughput of archlip's training step vs a reference-style loop.

The reference is the plain per-step loop of the TRADES/MART repositories (fp32, NCHW, ``model.eval()`` /
``model.train()`` toggles, per-step ``torch.autograd.grad`` with parameters requiring grad, max/min
projection then a [0, 1] clamp). Ours is ``experiments.training.loop.training_step`` (frozen parameters while
crafting, in-place fused sign/clamp; speed switches from the config). Both run on the same model, data and
optimiser settings, interleaved round by round so that machine load hits both alike. Goal: >= 1.3x on CPU.

Usage: python benchmarks/training_speed.py [--model wrn-16-1] [--batch 64] [--rounds 6] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.config import load_config
from experiments.models import create_model
from experiments.training.loop import autocast_factory, training_step
from _common import machine_name as _cpu_name, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "training_speed.json"


def reference_step(model, optimizer, x, y, eps, step_size, steps):
    """TRADES-repository style PGD-AT step (fp32, per-step autograd.grad, eval/train toggles)."""
    model.eval()
    x_adv = x.detach() + torch.empty_like(x).uniform_(-eps, eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def _timed(fn) -> tuple[float, float]:
    return timed(fn)[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wrn-16-1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=32, help="image size (3 x S x S inputs)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="fp32,channels_last", help="comma list of: fp32, channels_last, bf16, compile, bf16_compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.image, args.image, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    eps, step, steps = 8 / 255, 2 / 255, 10
    base_model = create_model(args.model, num_classes=10).to(device)

    def make_opt(m):
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)

    runners = {}
    ref_model = copy.deepcopy(base_model)
    ref_opt = make_opt(ref_model)
    runners["reference"] = lambda: reference_step(ref_model, ref_opt, x, y, eps, step, steps)
    for variant in [v for v in args.variants.split(",") if v]:
        sets = {"fp32": [], "channels_last": ["speed.channels_last=true"], "bf16": ["speed.amp=bf16", "speed.channels_last=true"],
                "compile": ["speed.compile=true", "speed.channels_last=true"],
                "bf16_compile": ["speed.amp=bf16", "speed.compile=true", "speed.channels_last=true"]}[variant]
        cfg = load_config(None, ["attack.eps=8/255", "attack.step_size=2/255", "attack.steps=10",
                                 "attack.random_start=uniform", "method.name=pgd_at", *sets])
        m = copy.deepcopy(base_model)
        xb = x
        if cfg.speed.channels_last:
            m = m.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        net = torch.compile(m) if cfg.speed.compile else m
        opt = make_opt(m)
        gen = torch.Generator(device=device).manual_seed(0)
        ac = autocast_factory(cfg, device)
        runners[f"ours_{variant}"] = (lambda cfg=cfg, net=net, opt=opt, xb=xb, gen=gen, ac=ac:
                                      training_step(cfg, net, net, opt, xb, y, generator=gen, noise_slice=None, autocast=ac))
    for fn in runners.values():  # warm-up (and compilation)
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: {"wall": [], "cpu": []} for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            def go(fn=fn):
                for _ in range(args.steps_per_round):
                    fn()
                sync()
            w, c = _timed(go)
            times[name]["wall"].append(w / args.steps_per_round)
            times[name]["cpu"].append(c / args.steps_per_round)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    summary = {}
    ref_wall, ref_cpu = med(times["reference"]["wall"]), med(times["reference"]["cpu"])
    for name, t in times.items():
        w, c = med(t["wall"]), med(t["cpu"])
        summary[name] = {"sec_per_step_wall": w, "sec_per_step_cpu": c, "images_per_sec_wall": args.batch / w,
                         "images_per_sec_cpu": args.batch / c, "speedup_wall": ref_wall / w, "speedup_cpu": ref_cpu / c}
    best = max((k for k in summary if k != "reference"), key=lambda k: summary[k]["speedup_cpu"])
    record = {"benchmark": "P3 training_speed", "model": args.model, "batch": args.batch, "image": args.image,
              "pgd_steps": steps, "threads": args.threads, "device": str(device), "rounds": args.rounds,
              "steps_per_round": args.steps_per_round, "results": summary, "best_variant": best,
              "goal_cpu_speedup": 1.3, "torch_version": str(torch.__version__), "machine": _cpu_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu_time_total": sum(sum(t["cpu"]) for t in times.values()) * args.steps_per_round,
              "wall_time_total": sum(sum(t["wall"]) for t in times.values()) * args.steps_per_round,
              "note": "machine shared with other jobs; medians over interleaved rounds; cpu = process time"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2))
    for name, r in summary.items():
        print(f"{name:22s} {r['images_per_sec_wall']:8.1f} img/s wall  {r['images_per_sec_cpu']:8.1f} img/s cpu  "
              f"x{r['speedup_wall']:.2f} wall  x{r['speedup_cpu']:.2f} cpu")
    b = summary[best]
    print(f"P3 {args.model} b{args.batch} PGD-10 {device.type}: {best} {b['speedup_cpu']:.2f}x cpu-time "
          f"({b['speedup_wall']:.2f}x wall) vs reference loop; goal 1.3x -> "
          f"{'met' if b['speedup_cpu'] >= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
