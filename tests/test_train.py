"""`vidsynth train` on the micro architecture: checkpoints, resume, loading through --model, and bad input."""

import errno
import json

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import vidsynth
from vidsynth import GenerationRequest
from vidsynth.cli import main
from vidsynth.data import ClipSpec, render, training_specs, vocabulary
from vidsynth.errors import VidsynthError, WriteError
from vidsynth.train import (ARCHITECTURES, Trainer, TrainOptions, architecture_of, build_components,
                            sample_timesteps, train)
from vidsynth.video import write_video

MICRO = dict(architecture="micro", batch_size=2, checkpoint_every=2, vae_steps=2, text_steps=2, lr=1e-3)


def progress_of(run):
    return json.loads((run / "model" / "training" / "progress.json").read_text())["progress"]


def test_train_save_resume_and_generate(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--architecture", "micro", "--steps", "3", "--vae-steps", "2", "--text-steps", "2",
                 "--batch-size", "2", "--checkpoint-every", "2"]) == 0
    assert progress_of(run)["step"] == 3 and progress_of(run)["vae_step"] == 2 and progress_of(run)["text_step"] == 2

    trainer = Trainer(TrainOptions(out=run, steps=5, **MICRO))  # picks up the checkpoint
    assert trainer.progress["step"] == 3
    resumed_weights = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.run()
    assert progress_of(run)["step"] == 5
    assert any(not torch.equal(v, trainer.unet.state_dict()[k]) for k, v in resumed_weights.items())

    pipeline = vidsynth.load(str(run / "model"), device="cpu", dtype="float32")
    video = pipeline("a red circle moving left on a black background", progress=False, steps=2, seed=0)
    assert video.frames.shape == (4, 32, 32, 3)  # the micro architecture's native size, from vidsynth.json
    # It knows the words of its captions, and a converted copy still does.
    assert pipeline.components.vocabulary == vocabulary(spec.caption for spec in training_specs())
    assert main(["convert", str(run / "model"), str(tmp_path / "copy")]) == 0
    copy = vidsynth.load(str(tmp_path / "copy"), device="cpu", dtype="float32")
    assert copy.components.vocabulary == pipeline.components.vocabulary
    request = GenerationRequest.create(prompt="a red bicycle moving left")
    assert copy.prompt_warnings(request) == [
        f"{copy.name} never saw 'bicycle' in its training captions and cannot draw what it says; it knows: "
        f"{', '.join(sorted(copy.components.vocabulary))}. A full-size model such as ms-1.7b reads any prompt"]


def test_resume_continues_from_the_saved_weights(tmp_path):
    run = tmp_path / "run"
    train(TrainOptions(out=run, steps=2, **MICRO))
    saved = vidsynth.loading.load_components(str(run / "model"))
    trainer = Trainer(TrainOptions(out=run, steps=2, **MICRO))
    ema_weights = trainer.components.unet.state_dict()  # the raw weights replace the EMA ones on resume
    from safetensors.torch import load_file
    raw = load_file(str(run / "model" / "training" / "unet.safetensors"))
    assert all(torch.equal(ema_weights[k], raw[k]) for k in raw)
    assert saved.vae.config.scaling_factor == trainer.vae.config.scaling_factor != 0.18215


def test_resuming_with_another_architecture_or_an_old_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    train(TrainOptions(out=run, steps=1, **MICRO))
    with pytest.raises(VidsynthError, match="was trained as 'micro', not 'tiny'"):
        Trainer(TrainOptions(out=run, steps=1, **{**MICRO, "architecture": "tiny"}))
    progress = run / "model" / "training" / "progress.json"
    progress.write_text(json.dumps({k: v for k, v in json.loads(progress.read_text()).items() if k != "format"}))
    with pytest.raises(VidsynthError, match="written by an older vidsynth"):
        Trainer(TrainOptions(out=run, steps=2, **MICRO))
    assert Trainer(TrainOptions(out=run, steps=2, resume=False, **MICRO)).progress["step"] == 0


def test_fine_tuning_checks_the_architecture_and_reuses_vae_and_text(tmp_path, tiny_model_dir):
    with pytest.raises(VidsynthError, match="does not have the 'micro' architecture"):
        Trainer(TrainOptions(out=tmp_path / "ft", init=str(tiny_model_dir), steps=1, **MICRO))
    options = TrainOptions(out=tmp_path / "ft", init=str(tiny_model_dir), steps=2, batch_size=1, checkpoint_every=10)
    trainer = Trainer(options)
    vae_before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    text_before = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    trainer.run()
    assert all(torch.equal(v, trainer.vae.state_dict()[k]) for k, v in vae_before.items())
    assert all(torch.equal(v, trainer.text_encoder.state_dict()[k]) for k, v in text_before.items())
    assert progress_of(tmp_path / "ft")["vae_step"] == 0
    # The model it started from learnt from captions unknown here, so the fine-tuned one claims no vocabulary.
    assert "vocabulary" not in json.loads((tmp_path / "ft" / "model" / "vidsynth.json").read_text())


def test_training_on_a_folder_of_captioned_videos(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index, spec in enumerate([ClipSpec("red", "circle", "left", "black"), ClipSpec("blue", "square", "up", "white")]):
        write_video(data / f"clip{index}.mp4", render(spec, 8, 48, np.random.default_rng(index)), 8, {}, sidecar=False)
        (data / f"clip{index}.txt").write_text(spec.caption)
    train(TrainOptions(out=tmp_path / "run", data=str(data), steps=1, **MICRO))
    assert progress_of(tmp_path / "run")["step"] == 1
    assert json.loads((tmp_path / "run" / "model" / "vidsynth.json").read_text())["vocabulary"] == [
        "a", "background", "black", "blue", "circle", "left", "moving", "on", "red", "square", "up", "white"]


def test_bad_datasets_fail_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out", str(tmp_path / "run"), "--architecture", "micro", "--data", str(tmp_path / "empty")]) == 2
    assert "holds no videos" in capsys.readouterr().err
    (tmp_path / "nocaption").mkdir()
    write_video(tmp_path / "nocaption" / "x.mp4", np.zeros((4, 16, 16, 3), np.uint8), 8, {}, sidecar=False)
    assert main(["train", "--out", str(tmp_path / "run"), "--architecture", "micro", "--data",
                 str(tmp_path / "nocaption")]) == 2
    assert "no caption file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be 1 or more"), ("--steps", "-3", "--steps must be 0 or more"),
    ("--text-steps", "-1", "--text-steps must be 0 or more"), ("--lr", "0", "--lr must be positive"),
    ("--checkpoint-every", "0", "--checkpoint-every must be 1 or more"), ("--workers", "-1", "--workers must be 0"),
    ("--max-minutes", "-1", "--max-minutes must not be negative"),
    ("--pure-noise-fraction", "1.5", "--pure-noise-fraction must be between 0 and 1")])
def test_bad_training_settings_fail_clearly(tmp_path, capsys, flag, value, message):
    assert main(["train", "--out", str(tmp_path / "run"), "--architecture", "micro", flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_be_made_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for out, message in [(tmp_path / "a-file", "is a file; give a folder for the run"),
                         (tmp_path / "a-file" / "run", "cannot create the run folder")]:
        assert main(["train", "--out", str(out), "--architecture", "micro", "--vae-steps", "1000"]) == 2
        error = capsys.readouterr().err
        assert message in error and "VAE" not in error  # no training step ran


# A full disk as each writer reports it: safetensors with its own error type (its message as it reads on Linux),
# torch.save and the JSON files with OSError.
DISK_FULL = {"save_model": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
             "torch.save": OSError(errno.ENOSPC, "No space left on device")}


@pytest.mark.parametrize("writer", DISK_FULL)
def test_full_disk_keeps_the_previous_checkpoint(writer, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(TrainOptions(out=run, steps=2, **MICRO))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    unet_bytes = (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    import vidsynth.train as train_module

    def disk_full(*args, **kwargs):
        raise DISK_FULL[writer]

    if writer == "save_model":
        monkeypatch.setattr(train_module, "save_model", disk_full)
    else:
        monkeypatch.setattr(train_module.torch, "save", disk_full)
    with pytest.raises(WriteError, match=r"\(No space left on device\); the previous checkpoint is kept"):
        train(TrainOptions(out=run, steps=4, **MICRO))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes
    assert progress_of(run)["step"] == 2


def test_models_from_scratch_learn_velocity_on_a_zero_terminal_snr_schedule(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(TrainOptions(out=run, steps=1, **MICRO))
    schedule = trainer.noise_schedule
    assert schedule.alphas_cumprod[-1] == 0  # the noisiest training step is pure noise, as sampling starts
    latents, noise = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    assert torch.allclose(schedule.get_velocity(latents, noise, torch.tensor([999, 999])), -latents)
    trainer.run()
    saved = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["prediction_type"], saved["rescale_betas_zero_snr"], saved["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")


def test_min_snr_weights_favour_the_noisy_steps(tmp_path, tiny_model_dir):
    steps = torch.tensor([999, 500, 100, 1])
    velocity = Trainer(TrainOptions(out=tmp_path / "v", steps=1, **MICRO))._loss_weights(steps)
    assert velocity[0] == velocity[1] == 1.0  # SNR + 1 below 5: full weight, pure noise included
    assert 0 < velocity[3] < velocity[2] < 1.0  # nearly clean steps count less, the cleaner the less
    fine_tuning = Trainer(TrainOptions(out=tmp_path / "eps", init=str(tiny_model_dir), steps=1, batch_size=2))
    assert fine_tuning.noise_schedule.config.prediction_type == "epsilon"  # the schedule of the model it starts from
    epsilon = fine_tuning._loss_weights(steps)
    assert epsilon[0] == epsilon[1] == 1.0
    assert 0 < epsilon[3] < epsilon[2] < 1.0


def test_a_share_of_training_steps_is_pure_noise(tmp_path, monkeypatch):
    torch.manual_seed(0)
    uniform, mixed = sample_timesteps(40000, 1000, 0.0), sample_timesteps(40000, 1000, 0.25)
    assert uniform.min() == mixed.min() == 0 and uniform.max() == mixed.max() == 999
    assert (uniform == 999).float().mean() < 0.002
    assert abs((mixed == 999).float().mean() - 0.25) < 0.01
    assert abs((mixed < 500).float().mean() - 0.75 / 2) < 0.01  # the rest stays uniform

    trainer = Trainer(TrainOptions(out=tmp_path / "run", steps=3, pure_noise_fraction=1.0,
                                   **{**MICRO, "text_steps": 0}))
    seen = []
    original = trainer.noise_schedule.add_noise
    monkeypatch.setattr(trainer.noise_schedule, "add_noise", lambda x, n, t: seen.append(t) or original(x, n, t))
    trainer.train_unet()
    assert len(seen) == 3 and all((t == 999).all() for t in seen)  # the training loop uses the option


def test_the_autoencoder_sees_frames_of_distinct_clips(tmp_path, monkeypatch):
    trainer = Trainer(TrainOptions(out=tmp_path / "run", steps=0, **{**MICRO, "vae_steps": 1}))
    seen = []
    original = trainer.vae.encode
    monkeypatch.setattr(trainer.vae, "encode", lambda frames: seen.append(frames) or original(frames))
    trainer.train_vae()
    frames = seen[0]
    assert frames.shape[0] == 32 and frames.ndim == 4
    assert len({frames[i].sum().item() for i in range(len(frames))}) > 16  # not copies of a few clips' frames


def test_a_finished_autoencoder_is_checkpointed_with_its_latent_scale(tmp_path):
    trainer = Trainer(TrainOptions(out=tmp_path / "run", steps=0, **{**MICRO, "checkpoint_every": 100}))
    trainer.train_vae()
    assert progress_of(tmp_path / "run")["vae_step"] == 2
    saved = vidsynth.loading.load_components(str(tmp_path / "run" / "model"))
    assert saved.vae.config.scaling_factor == trainer.vae.config.scaling_factor != 0.18215


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_put_attention_where_they_say(name):
    arch = ARCHITECTURES[name]
    components = build_components(arch)
    attended = [i for i, block in enumerate(components.unet.down_blocks) if hasattr(block, "attentions")]
    assert attended == list(arch.attention_levels)
    assert architecture_of(components)["attention_levels"] == list(arch.attention_levels)


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    train(TrainOptions(out=tmp_path / "run", steps=1000, max_minutes=0, **MICRO))
    assert progress_of(tmp_path / "run") | {"seconds": 0} == {"vae_step": 0, "text_step": 0, "step": 0, "seconds": 0}


def test_loader_workers_draw_distinct_seeded_streams(tmp_path):
    from vidsynth.data import ClipStream, ProceduralClips
    stream = ClipStream(ProceduralClips(4, 32), seed=3)
    first, again = next(iter(stream)), next(iter(ClipStream(ProceduralClips(4, 32), seed=3)))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]  # no workers: the seed alone decides
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    batches = iter(loader)
    from_worker_0, from_worker_1 = next(batches), next(batches)
    assert torch.equal(from_worker_0[0][0], first[0])  # worker 0 draws what the process itself would
    assert not torch.equal(from_worker_0[0], from_worker_1[0])
    train(TrainOptions(out=tmp_path / "run", steps=2, workers=2, **MICRO))
    assert progress_of(tmp_path / "run")["step"] == 2


def test_the_text_stage_teaches_words_only_the_motion_shows(tmp_path):
    from vidsynth.data import ClipSpec, ClipStream, ProceduralClips
    specs = [ClipSpec("red", "circle", direction, "black") for direction in ("left", "right", "up", "down")]
    trainer = Trainer(TrainOptions(out=tmp_path / "run", steps=0, **{**MICRO, "vae_steps": 0, "text_steps": 20}))
    trainer.data = ClipStream(ProceduralClips(4, 32, specs=specs), seed=1)
    tokenizer = trainer.components.tokenizer

    def closest_pair():  # the highest cosine similarity between two of the captions' encodings
        with torch.no_grad():
            ids = tokenizer([spec.caption for spec in specs], padding="max_length", max_length=77, return_tensors="pt").input_ids
            text = torch.nn.functional.normalize(trainer.text_encoder(ids).pooler_output, dim=-1)
        return (text @ text.T - 2 * torch.eye(len(specs))).max().item()

    def accuracy():
        clips = ProceduralClips(4, 32, seed=2, specs=specs)
        truth, videos = [], []
        for _ in range(32):
            clip, caption = clips.sample()
            truth.append(caption)
            videos.append(torch.from_numpy(clip))
        video = torch.stack(videos).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        captions = [spec.caption for spec in specs]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            text = torch.nn.functional.normalize(trainer.text_encoder(ids).pooler_output, dim=-1)
            clip_features = torch.nn.functional.normalize(trainer.matcher.video(video.transpose(1, 2)), dim=-1)
        guesses = (clip_features @ text.T).argmax(1).tolist()
        return np.mean([captions[g] == t for g, t in zip(guesses, truth)])

    before, similarity_before = accuracy(), closest_pair()
    trainer.train_text_encoder()
    assert not trainer.text_encoder.training and not any(p.requires_grad for p in trainer.text_encoder.parameters())
    # Captions one word apart start as near copies; afterwards the clips can be told apart by their captions alone,
    # and the encodings the UNet reads are far apart.
    assert similarity_before > 0.9 and closest_pair() < 0.5
    assert before <= 0.5 and accuracy() >= 0.9


def test_fine_tuning_can_start_a_new_text_encoder(tmp_path):
    base = tmp_path / "base"
    train(TrainOptions(out=base, steps=1, **MICRO))
    kept = Trainer(TrainOptions(out=tmp_path / "kept", init=str(base / "model"), steps=0, batch_size=2))
    new = Trainer(TrainOptions(out=tmp_path / "new", init=str(base / "model"), steps=0, batch_size=2,
                               new_text_encoder=True))
    embeddings = lambda trainer: trainer.text_encoder.get_input_embeddings().weight
    original = vidsynth.loading.load_components(str(base / "model")).text_encoder.get_input_embeddings().weight
    assert torch.equal(embeddings(kept), original) and not torch.allclose(embeddings(new), original, atol=1e-3)
    assert kept.options.text_steps == 0 and new.options.text_steps == 1000
    assert all(torch.equal(a, b) for a, b in zip(new.unet.state_dict().values(), kept.unet.state_dict().values()))
    with pytest.raises(VidsynthError, match="needs --text-steps above 0"):
        TrainOptions(out=tmp_path / "x", init=str(base / "model"), new_text_encoder=True, text_steps=0)
    with pytest.raises(VidsynthError, match="applies to fine-tuning"):
        TrainOptions(out=tmp_path / "x", new_text_encoder=True)


def test_ctrl_c_during_training_keeps_a_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    unet_step = Trainer._unet_step

    def interrupted_at_step_two(self):
        if self.progress["step"] == 1:
            raise KeyboardInterrupt
        return unet_step(self)
    monkeypatch.setattr(Trainer, "_unet_step", interrupted_at_step_two)
    code = main(["train", "--out", str(run), "--architecture", "micro", "--steps", "5", "--vae-steps", "1",
                 "--text-steps", "1", "--batch-size", "2", "--checkpoint-every", "100"])
    assert code == 130
    assert "run the same command to resume" in capsys.readouterr().err
    assert progress_of(run)["step"] == 1
