"""Write Zhu et al. (ICML 2023)'s recipe as configs, from one place.

    python configs/zhu/generate.py      # rewrites configs/zhu/*.yaml

Their comparison of D-SGD with C-SGD holds the number of iterations fixed
(6000) across total batches (16 x 64 = 1024 and 16 x 512 = 8192), scales the
learning rate linearly (0.1 per 64 samples per worker), uses plain SGD (no
momentum, no weight decay), warms up from 0.1x over 60 steps and decays x0.1 at
40 % and 80 % of the run; gossip mixes x^t before the gradient is applied
(gossip.order: gossip_first); ResNet-18 in its CIFAR form on images resized to
56 x 56, without augmentation, from ImageNet weights where there is internet.

  cifar10_resnet18_{csgd,ring,exponential}_{1024,8192}   the paper's cells, 16 GPUs
  fmnist_small_cnn_{csgd,ring,exponential}_{512,8192}    the same recipe at CPU
                                                         scale (16 x 32, 16 x 512)
"""

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TOPOLOGIES = {"csgd": "complete", "ring": "ring", "exponential": "exponential"}


def recipe(total_batch_per_worker: int, steps: int, world: int, spe: int) -> dict:
    return {
        "optim": {
            "name": "sgd", "lr": 0.1, "base_batch": 64 * world, "scale_lr": True,
            "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
            "warmup_steps": 60, "warmup_from": 0.1, "milestones": [0.4, 0.8], "decay": 0.1,
        },
        "gossip": {"order": "gossip_first"},
        "run": {"steps": steps},
        "data": {"batch_size": total_batch_per_worker, "augment": False},
    }  # fmt: skip


def cells():
    # (file stem, dataset, model, batch per worker, steps, world, steps per epoch, extras)
    for batch in (64, 512):
        spe = 50_000 // 16 // batch
        yield (f"cifar10_resnet18_{{}}_{16 * batch}", batch, 6000, spe, {
            "data": {"name": "cifar10", "root": "data/cifar10", "download": True, "resize": 56},
            "model": {"name": "resnet18", "pretrained": True},
            "metrics": {"log_every": 50, "exact_every": 50, "eval_every": round(500 / spe, 4),
                        "flush_every": 500, "sharpness_every": round(6000 / spe, 4),
                        "sharpness_samples": 2048},
        })  # fmt: skip
    for batch in (32, 512):
        spe = 60_000 // 16 // batch
        yield (f"fmnist_small_cnn_{{}}_{16 * batch}", batch, 600, spe, {
            "data": {"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist"},
            "model": {"name": "small_cnn"},
            "metrics": {"log_every": 10, "exact_every": 10, "eval_every": round(100 / spe, 4),
                        "flush_every": 100, "sharpness_every": round(600 / spe, 4),
                        "sharpness_samples": 1024},
        })  # fmt: skip


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def main() -> None:
    for old in HERE.glob("*.yaml"):
        old.unlink()
    for stem, batch, steps, spe, extras in cells():
        for short, topology in TOPOLOGIES.items():
            name = stem.format(short)
            body = merge(recipe(batch, steps, 16, spe), extras)
            body = merge(body, {
                "run": {"name": name, "seed": 0, "out_dir": "runs/zhu"},
                "topology": {"name": topology},
                "consensus": {"phases": [{"target": "none"}]},
            })  # fmt: skip
            order = ("run", "data", "model", "optim", "topology", "gossip", "consensus", "metrics")
            body = {k: body[k] for k in order}
            header = (
                f"# {name}: Zhu et al.'s recipe (configs/zhu/generate.py; edit that script).\n"
                f"# 16 workers x {batch} = {16 * batch} samples per step, {steps} steps.\n"
                f"#   mpirun -n 16 python -m mpi4py -m dsgd_mpi.run configs/zhu/{name}.yaml\n"
                f"#   python -m dsgd_mpi.sim configs/zhu/{name}.yaml --workers 16\n"
            )
            (HERE / f"{name}.yaml").write_text(header + yaml.safe_dump(body, sort_keys=False))


if __name__ == "__main__":
    main()
