"""`retrieve train`: a tiny run learns and beats pixels, resume reproduces, every arch steps, ckpt indexes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipelines.index_folder import build_index
from retrieval import open_index
from retrieval.backbones import get_spec
from retrieval.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.device import resolve_runtime
from retrieval.errors import RetrieveError
from retrieval.samples import SampleConfig, make_samples
from retrieval.training import (
    GENERAL_DEFAULTS,
    Augment,
    EpochStats,
    ImageSource,
    StepRunner,
    TrainConfig,
    TrainReporter,
    build_model,
    make_optimizer,
    train,
    trainable_archs,
    with_recipe,
)

runner = CliRunner()
EPOCHS = 15


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8-class generated set at 32 px: train/<class> (200 each) and test/<class> (16 each)."""
    return make_samples(
        tmp_path_factory.mktemp("shapes"), SampleConfig(per_class=200, test_per_class=16, size=32)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shapes: Path):
    """One short LeNet-5 run on the shapes, shared by the learning and checkpoint tests.

    Grey input: the shapes' colours are random, and one channel learned 2x faster than three in
    trials (52% vs 27% validation accuracy after ~10 s), which keeps this test within seconds.
    """
    config = TrainConfig(
        data=shapes,
        out=tmp_path_factory.mktemp("run") / "lenet",
        arch="lenet",
        channels=1,
        epochs=EPOCHS,
        batch_size=32,
        optimizer="adamw",
        lr=3e-3,
        workers=1,
    )
    return train(config)


def precision_at_k(vectors: np.ndarray, labels: list[str], k: int = 5) -> float:
    """Mean share of each item's k nearest others (exact L2, numpy) that share its label."""
    x = np.asarray(vectors, dtype=np.float64)
    d = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    nn_ids = np.argsort(d, axis=1)[:, :k]
    lab = np.asarray(labels)
    return float((lab[nn_ids] == lab[:, None]).mean())


# --------------------------------------------------------------------------------------------
# Learning


def test_tiny_run_learns_and_its_features_beat_pixels(trained, shapes: Path, tmp_path: Path) -> None:
    # Chance is 1/8 on 8 balanced classes.
    assert trained.best_val_acc is not None and trained.best_val_acc > 0.35, trained.history
    assert trained.epochs_completed == EPOCHS and not trained.interrupted
    losses = [h.train_loss for h in trained.history]
    assert losses[-1] < losses[0] - 0.3, losses

    # The run directory documents itself.
    run = trained.run_dir
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == list(range(1, EPOCHS + 1))
    report = json.loads((run / "report.json").read_text())
    conf = np.asarray(report["confusion"])
    assert conf.shape == (8, 8) and conf.sum() == 8 * 16
    assert abs(np.trace(conf) / conf.sum() - trained.best_val_acc) < 1e-9
    assert "confusion matrix" in (run / "report.txt").read_text()
    assert (run / "confusion.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["config"]["arch"] == "lenet"

    # Held-out images (never trained on): trained features vs raw pixels by precision@5.
    held_out = shapes / "test"
    scores = {}
    for name, backbone, weights in [
        ("trained", None, str(trained.best_checkpoint)),
        ("pixels", "pixels", None),
    ]:
        build_index(
            IndexConfig(images=held_out, index=tmp_path / name, backbone=backbone, weights=weights, workers=0)
        )
        idx = open_index(tmp_path / name)
        scores[name] = precision_at_k(idx.vectors(), idx.labels, k=5)
    assert scores["trained"] > scores["pixels"] + 0.1, scores


# --------------------------------------------------------------------------------------------
# Resume


class _CtrlCAt(TrainReporter):
    """Delivers a real SIGINT (Ctrl-C) to this process after a given optimiser step."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)
        self.epochs: list[EpochStats] = []

    def step(self, epoch: int, step: int, steps: int) -> None:
        if (epoch, step) == self.at:
            signal.raise_signal(signal.SIGINT)

    def epoch(self, stats: EpochStats) -> None:
        self.epochs.append(stats)


def _metrics(run: Path) -> list[tuple[float, ...]]:
    out = []
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(ln)
        out.append((m["train_loss"], m["train_acc"], m["val_loss"], m["val_acc"]))
    return out


def test_resume_after_an_interrupted_epoch_reproduces_the_uninterrupted_run(
    shapes: Path, tmp_path: Path
) -> None:
    base = dict(data=shapes, arch="lenet", channels=1, epochs=3, batch_size=64, workers=1, seed=3)
    full = train(TrainConfig(out=tmp_path / "full", **base))

    cut = train(TrainConfig(out=tmp_path / "cut", **base), _CtrlCAt(epoch=1, step=4))
    assert cut.interrupted and cut.epochs_completed == 1
    state = load_checkpoint(tmp_path / "cut" / "last.pt").extra["resume"]
    assert (state["epoch"], state["step"]) == (1, 4)  # mid-epoch state was saved
    assert not (tmp_path / "cut" / "report.json").exists()

    resumed = train(TrainConfig(data=None, out=None, resume=tmp_path / "cut"))
    assert not resumed.interrupted and resumed.epochs_completed == 3
    a, b = np.array(_metrics(tmp_path / "full")), np.array(_metrics(tmp_path / "cut"))
    assert a.shape == b.shape == (3, 4)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # The final weights agree as well (same data order, same crops, same optimiser state).
    wa = load_checkpoint(full.last_checkpoint).state_dict
    wb = load_checkpoint(resumed.last_checkpoint).state_dict
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4)


def test_airnet_stem_whitens_the_patches_it_was_shown() -> None:
    from retrieval.models import AirNet

    # Strongly correlated colour channels and neighbouring pixels: far from white.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 17, 17, generator=g)
    x = torch.einsum("ij,njhw->nihw", torch.tensor([[1.0, 0.9, 0.8], [0.0, 0.5, 0.4], [0.0, 0.0, 0.2]]), base)
    x = (x[..., 1:, 1:] + x[..., :-1, :-1]) / 2
    model = AirNet(10, 3)
    model.init_from_data(x)
    # Oracle in float64 numpy: second moment of every 2x2 patch, flattened like a conv kernel (c, kh, kw).
    xn = x.double().numpy()
    patches = np.stack(
        [xn[:, :, i : i + 2, j : j + 2].reshape(len(xn), -1) for i in range(15) for j in range(15)], 1
    ).reshape(-1, 12)
    moment = patches.T @ patches / len(patches)
    w = model.stem.weight.double().reshape(24, 12).numpy()
    white = w[:12] @ moment @ w[:12].T
    # Decorrelated, each direction scaled to unit variance up to the eps regulariser: lambda / (lambda + eps).
    lam = np.linalg.eigvalsh(moment)
    np.testing.assert_allclose(np.sort(np.diag(white)), np.sort(lam / (lam + 5e-4)), atol=1e-3)
    np.testing.assert_allclose(white - np.diag(np.diag(white)), 0, atol=1e-3)
    assert np.diag(white).min() > 0.5 and lam.max() / lam.min() > 100  # the input really was coloured
    np.testing.assert_allclose(w[12:], -w[:12])  # both signs survive the GELU
    assert not model.stem.weight.requires_grad


def test_airresnet_groups_add_an_identity_shortcut() -> None:
    from retrieval.models import _AirGroup

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16)
    for residual in (False, True):
        g = _AirGroup(8, 8, residual).eval()
        with torch.no_grad():
            g.conv2.weight.zero_()  # the second conv says nothing: only the shortcut can carry x
            h = g.act(g.bn1(g.pool(g.conv1(x))))
            # Fresh BN in eval maps 0 to 0: the group is GELU(h) with the shortcut, and 0 without it.
            torch.testing.assert_close(g(x), g.act(h) if residual else torch.zeros_like(h))
    assert all(
        m.residual for m in get_spec("airresnet_small").builder(10, 3).modules() if isinstance(m, _AirGroup)
    )
    assert not any(
        m.residual for m in get_spec("airnet_small").builder(10, 3).modules() if isinstance(m, _AirGroup)
    )


def test_training_airnet_whitens_its_stem_once_and_resume_keeps_it(shapes: Path, tmp_path: Path) -> None:
    base = dict(
        data=shapes,
        arch="airnet_small",
        channels=1,
        epochs=2,
        batch_size=100,
        workers=1,
        crop_pad=2,
        tta=True,
    )
    cut = train(TrainConfig(out=tmp_path / "r", **base), _CtrlCAt(epoch=1, step=3))
    assert cut.interrupted
    stem_cut = load_checkpoint(tmp_path / "r" / "last.pt").state_dict["stem.weight"]
    torch.manual_seed(0)
    fresh = get_spec("airnet_small").builder(8, 1).state_dict()["stem.weight"]
    assert not torch.allclose(stem_cut, fresh)  # the data-dependent init ran before training
    resumed = train(TrainConfig(data=None, out=None, resume=tmp_path / "r"))
    assert not resumed.interrupted and resumed.epochs_completed == 2
    final = load_checkpoint(resumed.last_checkpoint).state_dict
    torch.testing.assert_close(final["stem.weight"], stem_cut)  # frozen, and not re-whitened on resume
    assert not torch.equal(final["stem.bias"], torch.zeros_like(final["stem.bias"]))  # the bias learns
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["augment"]["pad"] == 2
    # Fields left unset came from airnet_small's recipe, and config.json says what they were.
    recipe = dict(get_spec("airnet_small").recipe)
    assert info["config"]["schedule"] == recipe["schedule"] and info["config"]["epochs"] == 2
    assert info["config"]["lr"] == pytest.approx(recipe["lr"] * 100 / recipe["batch_size"])


def test_training_recipe_fills_unset_fields_and_flags_override() -> None:
    general = with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="resnet18"))
    for k, v in GENERAL_DEFAULTS.items():
        assert getattr(general, k) == v
    assert (general.lr, general.weight_decay) == (0.1, 5e-4)  # 0.1 per 128 images, at 128
    assert with_recipe(general) == general  # idempotent: resume and make_optimizer re-apply it
    spec = get_spec("airnet_small")
    recipe = dict(spec.recipe)
    air = with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="airnet_small"))
    assert {k: getattr(air, k) for k in recipe} == recipe
    # A user-set batch scales the recipe's rate linearly; other flags win over the recipe.
    mine = with_recipe(
        TrainConfig(data=Path("."), out=Path("."), arch="airnet_small", batch_size=128, epochs=3, tta=False)
    )
    assert mine.lr == pytest.approx(recipe["lr"] * 128 / recipe["batch_size"])
    assert (mine.epochs, mine.tta, mine.label_smoothing) == (3, False, recipe["label_smoothing"])
    # The recipe's rate and decay are for its optimiser; another one gets the general defaults.
    adamw = with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="airnet_small", optimizer="adamw"))
    assert adamw.lr == pytest.approx(2e-3 * recipe["batch_size"] / 128) and adamw.weight_decay == 0.05
    # The recipe's flip TTA is dropped, not an error, when the user turns flips off.
    assert not with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="airnet_small", flip=False)).tta
    # Every recipe in the registry names real fields with values TrainConfig accepts.
    for arch in trainable_archs():
        fields = dict(get_spec(arch).recipe)
        assert set(fields) <= set(TrainConfig.__dataclass_fields__), arch
        TrainConfig(data=Path("."), out=Path("."), arch=arch, **fields)


def test_a_fine_tuning_recipe_applies_only_with_pretrained_weights() -> None:
    def cfg(**kw: object) -> TrainConfig:
        return with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="efficientnet_lite0", **kw))

    tuned = cfg(pretrained="imagenet")
    recipe = dict(get_spec("efficientnet_lite0").finetune_recipe)
    # Its rate is a fine-tuning rate already: not divided by 10 like the general rule's.
    assert (tuned.optimizer, tuned.lr, tuned.batch_size, tuned.epochs) == ("adamw", recipe["lr"], 32, 8)
    assert cfg(pretrained="imagenet", batch_size=64).lr == pytest.approx(2 * recipe["lr"])
    assert cfg(pretrained="imagenet", epochs=2).epochs == 2  # flags win
    # Another optimiser gets the general rule, divided by 10 for fine-tuning.
    assert cfg(pretrained="imagenet", optimizer="sgd").lr == pytest.approx(0.1 * 32 / 128 / 10)
    # From scratch the recipe is not used; a backbone without one keeps the general fine-tuning rule.
    scratch = cfg()
    assert (scratch.optimizer, scratch.lr, scratch.batch_size) == ("sgd", 0.1, 128)
    r18 = with_recipe(TrainConfig(data=Path("."), out=Path("."), arch="resnet18", pretrained="imagenet"))
    assert (r18.optimizer, r18.lr) == ("sgd", pytest.approx(0.01))
    # A run saved before the optimiser became recipe-defaulted resumes with the one it used.
    old = TrainConfig.from_dict({k: v for k, v in scratch.to_dict().items() if k != "optimizer"})
    assert old.optimizer == "sgd"
    for arch in trainable_archs():
        fields = dict(get_spec(arch).finetune_recipe)
        assert set(fields) <= set(TrainConfig.__dataclass_fields__), arch
        TrainConfig(data=Path("."), out=Path("."), arch=arch, **fields)


def test_norm_bias_lr_scale_speeds_up_only_the_norm_shifts() -> None:
    torch.manual_seed(0)
    model = get_spec("airnet_small").builder(4, 3)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    moved = {}
    for scale in (1.0, 64.0):
        model.load_state_dict(start, strict=False)
        cfg = TrainConfig(
            data=Path("."),
            out=Path("."),
            arch="airnet_small",
            lr=0.01,
            weight_decay=0.0,
            norm_bias_lr_scale=scale,
        )
        opt = make_optimizer(model, cfg)
        assert len(opt.param_groups) == (2 if scale == 1.0 else 3)  # scale 1: the layout old runs saved
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # first SGD step: the update is linear in each group's rate
        moved[scale] = {k: p.detach() - start[k] for k, p in model.named_parameters() if p.requires_grad}
    bn_biases = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_biases and bn_biases <= set(moved[1.0])
    for k, d in moved[1.0].items():
        expect = 64 * d if k in bn_biases else d  # the stem's conv bias is not a norm shift
        torch.testing.assert_close(moved[64.0][k], expect, rtol=1e-4, atol=1e-7)
    # A run saved before the option existed resumes with the rate it was trained with.
    saved = TrainConfig(data=Path("."), out=Path("."), arch="airnet_small").to_dict()
    del saved["norm_bias_lr_scale"]
    assert with_recipe(TrainConfig.from_dict(saved)).norm_bias_lr_scale == 1.0
    with pytest.raises(RetrieveError, match="norm_bias_lr_scale"):
        TrainConfig(data=Path("."), out=Path("."), norm_bias_lr_scale=0)


def test_flip_tta_validates_on_the_mean_logits_of_image_and_mirror() -> None:
    from retrieval.images import Transform
    from retrieval.preprocess import Preprocess

    torch.manual_seed(0)
    model = get_spec("resnet8_small").builder(4, 3).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    source = ImageSource([], [], Transform(Preprocess(size=32, resize=32)), 1, False, torch.device("cpu"))
    source.images, source.labels = x, y
    augment = Augment("crop", 32, 2, True, (0.5,) * 3, (0.25,) * 3, False)
    runtime = resolve_runtime("cpu", "float32")
    results = {}
    for tta in (False, True):
        step = StepRunner(model, torch.optim.SGD(model.parameters(), lr=0.0), None, runtime, augment, tta=tta)
        results[tta] = step.evaluate(source, 16, 4)
    # Oracle: the same logits computed by hand (evaluate() hands the model back in train mode).
    model.eval()
    with torch.no_grad():
        inputs = augment.eval(x)
        plain, mirrored = model(inputs), model(inputs.flip(-1))
    for tta, logits in ((False, plain), (True, (plain + mirrored) / 2)):
        loss, acc, conf = results[tta]
        assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
        assert conf.sum() == 40
    assert results[True][0] != pytest.approx(results[False][0], rel=1e-5)  # the mirror really was used
    with pytest.raises(RetrieveError, match="needs flip"):
        TrainConfig(data=Path("."), out=Path("."), tta=True, flip=False)
    with pytest.raises(RetrieveError, match="crop_pad"):
        TrainConfig(data=Path("."), out=Path("."), crop_pad=-1)


# --------------------------------------------------------------------------------------------
# Every architecture


@pytest.mark.parametrize("arch", trainable_archs())
def test_every_architecture_takes_a_training_step(arch: str) -> None:
    # One-channel input everywhere (the adapted stem is the path most likely to break); three
    # channels are stepped by the training runs below and walked for every node in test_backbones.
    spec = get_spec(arch)
    size = 64 if arch == "alexnet" else 32  # AlexNet's stem needs at least 63 px
    runtime = resolve_runtime("cpu", "float32")
    for channels in (1, 3) if arch in ("lenet", "resnet8_small") else (1,):
        torch.manual_seed(0)
        model, _ = build_model(spec, 3, channels, None)
        config = TrainConfig(data=Path("."), out=Path("."), arch=arch, lr=0.01, batch_size=2)
        augment = Augment("crop", size, 2, True, (0.5,) * channels, (0.25,) * channels, False)
        step = StepRunner(model, make_optimizer(model, config), None, runtime, augment, 0.1, 1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
        loss, correct = step(x, torch.tensor([0, 2]), torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and 0 <= int(correct) <= 2
        changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]
        assert any(not torch.equal(before[k], model.state_dict()[k]) for k in changed), arch
        # Its registry node gives the registered embedding size, so the trained net can be indexed.
        from torchvision.models.feature_extraction import create_feature_extractor

        model.eval()
        with torch.no_grad():
            feats = create_feature_extractor(model, {spec.node: "f"})(torch.zeros(1, channels, size, size))[
                "f"
            ]
        assert feats.flatten(1).shape[1] == spec.dim, (arch, feats.shape)


# --------------------------------------------------------------------------------------------
# Checkpoints through `retrieve index`


def test_checkpoint_round_trips_through_index_weights(trained, shapes: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained.best_checkpoint)
    r = invoke("index", shapes / "test", "--weights", trained.best_checkpoint, "--index", tmp_path / "i")
    assert r.exit_code == 0, r.output
    idx = open_index(tmp_path / "i")
    assert idx.manifest.backbone == "lenet"
    assert json.dumps(idx.manifest.to_dict()).count("checkpoint") >= 1

    # Oracle: the checkpoint's model with the preprocessing written by hand (PIL + numpy).
    from PIL import Image

    model = get_spec("lenet").builder(ckpt.num_classes, ckpt.in_channels)
    model.load_state_dict(ckpt.state_dict)
    model.classifier[2] = torch.nn.Identity()  # the 84-d FC after ReLU is the embedding
    model.eval()
    pre = ckpt.preprocess
    assert (pre.size, pre.channels, ckpt.classes) == (32, 1, tuple(sorted(os.listdir(shapes / "test"))))
    files = [idx.root / p for p in idx.paths[::9]]
    arrays = [
        (np.asarray(Image.open(f).convert("L"), dtype=np.float32)[None] / 255 - pre.mean[0]) / pre.std[0]
        for f in files
    ]
    with torch.no_grad():
        want = model(torch.tensor(np.stack(arrays), dtype=torch.float32)).numpy()
    got = np.asarray(idx.vectors()[::9])
    cos = (want * got).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.99, cos  # bf16 autocast at index time on CPUs that have it
    # Queried from disk, each file finds itself: queries are embedded with what the manifest
    # recorded, so a wrong preprocessing there fails here, not only in the slow demo test.
    hits = idx.search_paths(files, k=1)
    assert [h[0].path for h in hits] == [f.relative_to(idx.root).as_posix() for f in files]
    scale = float(np.linalg.norm(got, axis=1).max())
    assert max(h[0].distance for h in hits) < 1e-2 * scale, hits


def test_other_arch_and_corrupt_checkpoints_are_clear_errors(trained, shapes: Path, tmp_path: Path) -> None:
    r = invoke("index", shapes / "test", "--backbone", "resnet18", "--weights", trained.best_checkpoint)
    assert r.exit_code == 2 and "is a 'lenet' model" in r.output and "Traceback" not in r.output

    # A checkpoint that claims another architecture than its tensors fit.
    ckpt = load_checkpoint(trained.best_checkpoint)
    liar = Checkpoint(
        "resnet8_small", ckpt.state_dict, ckpt.classes, ckpt.preprocess, ckpt.num_classes, ckpt.in_channels
    )
    save_checkpoint(liar, tmp_path / "liar.pt")
    r = invoke("index", shapes / "test", "--weights", tmp_path / "liar.pt", "--index", tmp_path / "i")
    assert r.exit_code == 2 and "does not fit resnet8_small" in r.output and "Traceback" not in r.output

    truncated = trained.best_checkpoint.read_bytes()[:5000]
    (tmp_path / "bad.pt").write_bytes(truncated)
    for args in (
        ["index", shapes / "test", "--weights", tmp_path / "bad.pt", "--index", tmp_path / "j"],
        ["train", "--resume", tmp_path / "bad.pt"],
    ):
        r = invoke(*args)
        assert r.exit_code == 2 and "not a readable checkpoint" in r.output, r.output
        assert "Traceback" not in r.output
    # An index-only checkpoint (no training state) cannot be resumed, and says so.
    r = invoke("train", "--resume", tmp_path / "liar.pt")
    assert r.exit_code == 2 and "cannot be resumed" in r.output


# --------------------------------------------------------------------------------------------
# Data errors and the CLI


def test_unusable_folders_are_one_clear_line(shapes: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one" / "circle"
    one.mkdir(parents=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((shapes / "train" / "circle").iterdir())[:3]):
        (one / f.name).write_bytes(f.read_bytes())
        (flat / f"{i}.png").write_bytes(f.read_bytes())
    cases = [
        (tmp_path / "empty", "no images"),
        (tmp_path / "one", "only one class"),
        (flat, "not inside class folders"),
        (tmp_path / "missing", "is not a folder"),
    ]
    for folder, message in cases:
        r = invoke("train", folder, "--arch", "lenet", "--out", tmp_path / "out")
        assert r.exit_code == 2, (folder, r.output)
        assert message in " ".join(r.output.split()), (message, r.output)
        assert "Traceback" not in r.output
    with pytest.raises(RetrieveError, match="nothing to train"):
        train(TrainConfig(data=shapes, out=tmp_path / "px", arch="pixels"))


def test_help_teaches_the_workflow() -> None:
    r = invoke("train", "--help")
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    for needle in ("--resume", "--weights", "--arch", "resnet8_small", "Ctrl-C", "--val-fraction"):
        assert needle in text, needle


def test_real_subprocess_trains_and_ctrl_c_saves_a_resumable_run(shapes: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("retrieve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "retrieval"]
    run = tmp_path / "run"
    args = [*cmd, "train", str(shapes), "--arch", "lenet", "--epochs", "500", "--out", str(run)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait for the first finished epoch, then press Ctrl-C
        lines.append(line)
        if line.lstrip().startswith("epoch") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"retrieve train --resume {run}" in " ".join(err.split())
    state = load_checkpoint(run / "last.pt").extra["resume"]
    assert state["epoch"] >= 1 and (run / "best.pt").is_file()

    # Continue it for a short schedule: the real CLI accepts --resume alone.
    env = dict(os.environ)
    done = subprocess.run(
        [*cmd, "train", "--resume", str(run), "--stop-after-epochs", str(state["epoch"] + 1)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"epoch {state['epoch'] + 1:>3d}/500" in done.stderr


def test_process_decode_equals_thread_decode(shapes: Path, tmp_path: Path, monkeypatch) -> None:
    import retrieval.training.data as train_mod
    from retrieval.images import Transform
    from retrieval.preprocess import Preprocess

    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths = sorted((shapes / "test").rglob("*.png"))[:40]
    paths.insert(7, tmp_path / "bad.png")
    transform = Transform(Preprocess(size=24, resize=28, channels=1))
    threads = train_mod.decode_to_memory(paths, transform, 2)
    monkeypatch.setattr(train_mod, "PROCESS_DECODE_MIN", 1)
    procs = train_mod.decode_to_memory(paths, transform, 2)
    assert torch.equal(procs[0], threads[0]) and procs[0].shape == (41, 1, 24, 24)
    assert procs[1].tolist() == threads[1].tolist() and not procs[1][7]
    assert procs[2] == threads[2] and procs[2][0][0] == 7


def test_missing_pretrained_weights_say_how_to_train_instead(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    import torchvision

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")  # never download in a test

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    r = invoke("train", shapes, "--arch", "alexnet", "--pretrained", "imagenet", "--out", tmp_path / "r")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "not cached" in text and "drop --pretrained" in text, r.output
    assert "Traceback" not in r.output and not (tmp_path / "r" / "last.pt").exists()


def test_fine_tuning_starts_from_the_imagenet_weights_and_records_their_preprocessing(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--pretrained imagenet`: the body starts from the cached weights, the head is new, the
    checkpoint records the weights' normalisation, and it indexes with no other flag.

    Real ImageNet files cannot be fetched here, so torchvision's loader is replaced by one that
    returns a seeded network standing in for them (the rest of the path is ours and runs as is).
    """
    import torchvision

    real_get_model = torchvision.models.get_model

    def cached(name: str, weights: object = None, **kwargs: object) -> torch.nn.Module:
        if weights is None:  # the registry's own builders (e.g. `index --weights ckpt`) pass through
            return real_get_model(name, weights=None, **kwargs)
        torch.manual_seed(123)
        return real_get_model(name, weights=None)

    monkeypatch.setattr(torchvision.models, "get_model", cached)
    start = {k: v.clone() for k, v in cached("resnet18", weights="imagenet").state_dict().items()}
    run = tmp_path / "ft"
    # A few small real steps (lr 0 would make the check trivial): the body stays near its start,
    # whereas any other initialisation is as far from it as the weights are long.
    r = invoke(
        "train", shapes, "--arch", "resnet18", "--pretrained", "imagenet", "--image-size", "32",
        "--epochs", "1", "--batch-size", "256", "--lr", "1e-4", "--out", run, "--workers", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(run / "last.pt")
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    assert ckpt.preprocess.mean == tuple(weights.transforms().mean)
    assert ckpt.state_dict["fc.weight"].shape == (8, 512)  # a new head for the 8 shape classes
    conv1 = ckpt.state_dict["conv1.weight"]
    moved = (conv1 - start["conv1.weight"]).norm() / start["conv1.weight"].norm()
    assert moved < 0.05, f"the body did not start from the ImageNet weights (moved {moved:.3f})"
    res = invoke("index", shapes / "test", "--weights", run / "last.pt", "--index", tmp_path / "idx")
    assert res.exit_code == 0, res.output
    assert len(open_index(tmp_path / "idx")) == 8 * 16
