"""The `vidsynth` command. Exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import unicodedata
import warnings
from pathlib import Path

from . import __version__
from .devices import DEVICE_CHOICES, DTYPE_CHOICES, OFFLOAD_MODES
from .errors import OutputError, RequestError, UsageError, VidsynthError
from .request import MAX_PROMPTS, MAX_SEED, MAX_VIDEOS, PRESETS, SCHEDULERS, GenerationRequest

# GenerationRequest field -> the CLI flag that sets it, so errors name what the user typed.
FLAGS = {
    "prompt": "PROMPT", "negative_prompt": "--negative", "seed": "--seed", "frames": "--frames", "height": "--height",
    "width": "--width", "steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler", "eta": "--eta",
    "fps": "--fps", "num_videos": "--num-videos", "preset": "--preset", "cache_interval": "--cache-interval",
    "guidance_fraction": "--guidance-fraction", "init_video": "--init-video", "strength": "--strength",
    "device": "--device", "dtype": "--dtype", "offload": "--offload",
    "compile": "--compile",
}
REPLAYED = ("prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "guidance", "scheduler", "eta",
            "fps", "cache_interval", "guidance_fraction", "init_video", "strength")


# Commands that start no processes or threads which outlive them: they may skip Python's shutdown (`entry_point`).
ONE_SHOT_COMMANDS = ("generate", "eval", "convert", "info", "models", "download")


def entry_point() -> None:
    """The `vidsynth` console script."""
    args = build_parser().parse_args()
    code = run(args)
    if args.command in ONE_SHOT_COMMANDS:
        # Python's shutdown tears down the ~3,000 modules torch, diffusers and transformers load, one by one: 1.3 s
        # of the 10 s a first video may take on a 2-core CPU, for nothing, since these commands have closed every
        # file they wrote before returning. Only the standard streams still hold buffered output.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """The CLI as a function: the exit code of the command `argv` (default: the process's arguments)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "compile", False):
        # Before torch._dynamo is imported (diffusers imports it), which sets inductor's default, under /tmp.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_folder()))
    _quiet_warnings()
    try:
        return args.run(args) or 0
    except RequestError as exc:
        return _fail(f"{FLAGS.get(exc.field, exc.field)}: {exc.message}", exc.exit_code)
    except VidsynthError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130)


def compile_cache_folder() -> Path:
    """Where `--compile` keeps torch's compiled kernels for later processes unless TORCHINDUCTOR_CACHE_DIR says: in
    the user's cache folder, since inductor's own default is under /tmp, which a reboot or a container's end empties.
    Set by the command, not the library: a program importing vidsynth keeps torch's own setting."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vidsynth" / "torch-compile"


def _fail(message: str, code: int) -> int:
    print(f"vidsynth: error: {message}", file=sys.stderr)
    return code


def _quiet_warnings() -> None:
    """Warnings as one line each, the model libraries' logging off."""
    warnings.showwarning = lambda message, category, *rest: print(f"vidsynth: warning: {message}", file=sys.stderr)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers and transformers set their loggers' level as they are imported, from these (a person may set them).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _before_loading(model: str | None, args, announce: bool = True) -> None:
    """What every command that loads a model does once its own arguments are checked: refuse a model reference that
    points nowhere, say that the model loads, then import the model libraries and turn their loading bars off. In that
    order, because importing them takes seconds (BENCHMARKS.md, "The shipped model on a laptop-class CPU"), which a
    mistyped command should not wait for, nor a person wait through without a word."""
    from .loading import model_source
    model_source(model)
    if announce:
        _status(f"loading {model or 'the shipped model'}...", args)
    import diffusers.utils.logging
    import transformers.utils.logging
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def setting_help(name: str) -> str:
    """A generation setting's help: its description and the values it takes, as GenerationRequest declares them."""
    field = GenerationRequest.model_fields[name]
    bounds = {key: getattr(rule, key) for rule in field.metadata for key in ("ge", "gt", "le") if hasattr(rule, key)}
    if "gt" in bounds:
        values = f" Takes more than {bounds['gt']:g}, at most {bounds['le']:g}."
    elif "ge" in bounds and bounds["le"] < MAX_SEED:  # a seed's upper bound is no help
        values = f" Takes {bounds['ge']:g} to {bounds['le']:g}."
    elif "ge" in bounds:
        values = f" Takes {bounds['ge']:g} or more."
    else:
        values = ""
    default = "" if field.default is None or field.default is False or field.default == "" else \
        f" Default: {field.default}."
    return (field.description + default + values).replace("%", "%%")  # argparse formats help with %


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidsynth", description="Text-to-video with ModelScope-architecture models.")
    parser.add_argument("--version", action="version", version=f"vidsynth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="make videos from a prompt")
    generate.add_argument("prompt", nargs="*", help="the prompt (several words are joined); give several with --prompt")
    generate.add_argument("--prompt", dest="extra_prompts", action="append", default=[], metavar="TEXT",
                          help="another prompt (repeatable): each makes its own video(s)")
    generate.add_argument("-o", "--output", help="output file: .mp4 .webm .gif .npy, or a folder for PNG frames "
                          "(default: a name from the prompt and seed, as .mp4)")
    generate.add_argument("--from", dest="replay", metavar="FILE", help="re-run the settings stored in a video or JSON sidecar")
    generate.add_argument("--model", help="alias, folder or hub id (default: the shipped model)")
    generate.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help=setting_help("negative_prompt"))
    generate.add_argument("--seed", type=int, help=setting_help("seed"))
    generate.add_argument("--frames", type=int, help=setting_help("frames"))
    generate.add_argument("--height", type=int, help=setting_help("height"))
    generate.add_argument("--width", type=int, help=setting_help("width"))
    generate.add_argument("--steps", type=int, help=setting_help("steps"))
    generate.add_argument("--guidance", type=float, help=setting_help("guidance"))
    generate.add_argument("--scheduler", choices=SCHEDULERS, help=setting_help("scheduler"))
    generate.add_argument("--preset", choices=tuple(PRESETS), help=setting_help("preset"))
    generate.add_argument("--cache-interval", type=int, help=setting_help("cache_interval"))
    generate.add_argument("--guidance-fraction", type=float, help=setting_help("guidance_fraction"))
    generate.add_argument("--eta", type=float, help=setting_help("eta"))
    generate.add_argument("--fps", type=int, help=setting_help("fps"))
    generate.add_argument("--num-videos", type=int, help=setting_help("num_videos"))
    generate.add_argument("--init-video", metavar="FILE", help=setting_help("init_video"))
    generate.add_argument("--strength", type=float, help=setting_help("strength"))
    generate.add_argument("--allow-empty-prompt", action="store_true", help=setting_help("allow_empty_prompt"))
    _add_runtime_options(generate)
    generate.add_argument("--json", action="store_true", help="print the results as JSON on stdout: each video's "
                          "path, settings and the warnings of its request")
    generate.set_defaults(run=run_generate)

    convert = commands.add_parser("convert", help="write any model as a diffusers-layout folder of safetensors")
    convert.add_argument("source", help="alias, folder (diffusers or ModelScope layout) or hub id")
    convert.add_argument("destination", help="new folder")
    convert.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    convert.set_defaults(run=run_convert)

    info = commands.add_parser("info", help="print the settings a video was made with")
    info.add_argument("file")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)

    models = commands.add_parser("models", help="list known model aliases and what is available locally")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=run_models)

    download = commands.add_parser("download", help="fetch a model into the hub cache now, so later runs start "
                                   "without waiting (or offline)")
    download.add_argument("model", help="alias or hub id (Hugging Face owner/name, modelscope:owner/name)")
    download.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="the precision it will run in: "
                          "float16 and bfloat16 fetch a repo's float16 files where it has them (default: what "
                          "--dtype auto picks on this machine)")
    download.set_defaults(run=run_download)

    evaluate = commands.add_parser("eval", help="score a model on held-out captions of the shapes dataset")
    evaluate.add_argument("--model", help="alias, folder or hub id (default: the shipped model)")
    evaluate.add_argument("--prompts", type=int, default=50, help="how many held-out captions (default 50)")
    evaluate.add_argument("--seeds", type=int, default=3, help=f"videos per caption, 1-{MAX_VIDEOS} (default 3)")
    evaluate.add_argument("--seed", type=int, default=0, help="the first video's seed (default 0); each further "
                          f"video of a batch of {MAX_PROMPTS} captions takes the next")
    evaluate.add_argument("--steps", type=int, help=setting_help("steps"))
    evaluate.add_argument("--guidance", type=float, help=setting_help("guidance"))
    evaluate.add_argument("--guidance-fraction", type=float, help=setting_help("guidance_fraction"))
    evaluate.add_argument("--scheduler", choices=SCHEDULERS, help=setting_help("scheduler"))
    evaluate.add_argument("--preset", choices=tuple(PRESETS), help=setting_help("preset"))
    evaluate.add_argument("--json", dest="json_path", metavar="FILE", help="write every result as JSON here")
    _add_runtime_options(evaluate)
    evaluate.set_defaults(run=run_eval)

    serve = commands.add_parser("serve", help="run the job API and web page")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", help="alias, folder or hub id (default: the shipped model)")
    serve.add_argument("--data-dir", default="vidsynth-data", help="where the job database and videos live")
    serve.add_argument("--token", default=os.environ.get("VIDSYNTH_TOKEN"),
                       help="require 'Authorization: Bearer TOKEN' on every route but /healthz (default: $VIDSYNTH_TOKEN)")
    serve.add_argument("--allow-remote-without-token", action="store_true",
                       help="bind a non-loopback address with no token (anyone who can reach it can use it)")
    serve.add_argument("--max-queue", type=int, default=100, help="queued jobs beyond this get HTTP 429")
    serve.add_argument("--keep-jobs", type=int, default=500, help="finished jobs kept with their files; older are deleted")
    _add_runtime_options(serve)
    serve.set_defaults(run=run_serve)

    train = commands.add_parser("train", help="train a model (from scratch or fine-tuning) and checkpoint it")
    train.add_argument("--out", required=True, help="run folder; the model is written to OUT/model")
    train.add_argument("--architecture", help="size preset for training from scratch: tiny (default), micro")
    train.add_argument("--init", help="fine-tune this model (alias, folder or hub id) instead of starting from scratch")
    train.add_argument("--data", default="procedural", help="'procedural' (default) or a folder of videos with <name>.txt captions")
    train.add_argument("--steps", type=int, default=4000, help="UNet steps")
    train.add_argument("--vae-steps", type=int, default=1500)
    train.add_argument("--text-steps", type=int, help="contrastive text-encoder steps (default: 1000 for a new encoder, "
                       "0 when fine-tuning: the model's text encoder is kept)")
    train.add_argument("--new-text-encoder", action="store_true", help="fine-tuning: train a fresh text encoder of the "
                       "same size instead of keeping the model's (for a model that ignores some words)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--pure-noise-fraction", type=float, default=0.0,
                       help="share of UNet clips trained at the pure-noise step, where only the caption sets layout and "
                            "motion (default 0: uniform steps; the shipped model was trained with 0.3)")
    train.add_argument("--checkpoint-every", type=int, default=250)
    train.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    train.add_argument("--device", default="auto")
    train.add_argument("--workers", type=int, help="processes drawing training clips (default: up to 8 on CUDA, "
                       "none on the CPU)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if OUT has a checkpoint")
    train.set_defaults(run=run_train)
    return parser


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run (default auto: a CUDA GPU, else Apple's MPS, else the CPU)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="precision (default auto: float16 on CUDA, bfloat16 on a CPU with native bf16, else "
                        "float32)")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                        help="keep weights on the CPU and move them to the GPU as needed (for small GPUs): a model at "
                        "a time, or layer by layer (sequential)")
    parser.add_argument("--forward-chunking", action=argparse.BooleanOptionalAction, default=None,
                        help="low-memory mode: feed-forward layers one frame at a time, and on the CPU freed memory "
                        "handed back between steps (slower). Default: on the CPU when a video would not fit otherwise")
    parser.add_argument("--compile", action="store_true", help="compile the UNet with torch.compile (CUDA: with CUDA "
                        "graphs); the first video of each shape pays the compile time (serve: the model's own "
                        "video size is compiled at start)")


RUNTIME_OPTIONS = ("device", "dtype", "offload", "forward_chunking", "compile")


def _runtime(args) -> dict:
    """The keyword arguments of `vidsynth.load` that the runtime flags set."""
    return {name: getattr(args, name) for name in RUNTIME_OPTIONS}


# ------------------------------------------------------------------------------------------------------- generate

def request_from_args(args) -> tuple[GenerationRequest, str | None]:
    """The validated request and model the arguments (and --from file) describe."""
    from .video import read_settings
    fields, model = {}, None
    if args.replay:
        stored = read_settings(args.replay)
        fields = {key: stored[key] for key in REPLAYED if key in stored}
        model = stored.get("model")
    prompts = ([" ".join(args.prompt)] if args.prompt else []) + args.extra_prompts
    if prompts:
        fields["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    elif "prompt" not in fields:
        if not args.allow_empty_prompt:
            raise UsageError("give a prompt (or --from FILE, or --allow-empty-prompt for unconditional generation)")
        fields["prompt"] = ""
    for name in REPLAYED[1:]:  # every stored setting but the prompt, handled above
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.init_video is not None:  # recorded in full, so that --from finds it again from anywhere
        fields["init_video"] = str(Path(args.init_video).expanduser().absolute())
    if args.preset is not None:
        fields["preset"] = args.preset
    if args.num_videos is not None:
        fields["num_videos"] = args.num_videos
    fields["allow_empty_prompt"] = args.allow_empty_prompt
    return GenerationRequest.create(**fields), args.model or model


def output_paths(output: str | None, videos) -> list[Path]:
    from .video import numbered_paths

    if output is None:
        return [Path(f"{_slug(v.settings['prompt'])}-{v.seed}.mp4") for v in videos]
    return numbered_paths(output, len(videos))


def _slug(text: str) -> str:
    latin = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # "grün" -> "grun", not "gr-n"
    return re.sub(r"[^a-z0-9]+", "-", latin.lower()).strip("-")[:60] or "video"


def run_generate(args) -> int:
    from .progress import ProgressBar
    from .video import check_output_path, read_start_video

    request, model = request_from_args(args)
    check_output_path(args.output or "video.mp4")  # fail on a bad path before loading anything
    if request.init_video is not None:
        read_start_video(request.init_video, limit=1)  # readable at all; the pipeline reads what it uses
    if args.output and request.total_videos > 1:
        for path in output_paths(args.output, [None] * request.total_videos):
            check_output_path(path)
    _before_loading(model, args)
    from .pipeline import load
    pipeline = load(model, **_runtime(args))
    if args.replay:
        _say_if_the_dtype_differs(args.replay, pipeline)
    if args.compile:
        _status("the first step compiles the UNet for this video's size: minutes the first time, less in later runs",
                args)
    with ProgressBar(disable=args.json) as bar:
        videos = pipeline.generate(request, bar)
    results = []
    for video, path in zip(videos, output_paths(args.output, videos)):
        written = video.save(path)
        results.append({"path": str(written), "settings": video.settings, "warnings": bar.warnings})
        _status(f"wrote {written} (seed {video.seed})", args)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _say_if_the_dtype_differs(replayed: str, pipeline) -> None:
    """Another precision gives a close video, not the same one: say so, since --from promises the same."""
    from .devices import dtype_name
    from .video import read_settings

    recorded, running = read_settings(replayed).get("dtype"), dtype_name(pipeline.dtype)
    if recorded and recorded != running:
        print(f"vidsynth: note: {replayed} was made in {recorded} and this runs in {running}: the video will be "
              f"close to it, not the same (--dtype {recorded} to match)", file=sys.stderr)


def _status(message: str, args) -> None:
    if not getattr(args, "json", False):
        print(message, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ other commands

def run_convert(args) -> int:
    import torch

    from .files import atomic_folder
    from .loading import load_components, save_model_folder

    destination = Path(args.destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise OutputError(f"{destination} already exists and is not an empty folder")
    if not destination.parent.is_dir():
        raise OutputError(f"output directory {destination.parent} does not exist")
    _before_loading(args.source, args)
    components = load_components(args.source)
    with atomic_folder(destination) as partial:
        save_model_folder(components, partial, dtype=getattr(torch, args.dtype))
    print(f"wrote {destination} (diffusers layout, {args.dtype})", file=sys.stderr)
    return 0


def run_info(args) -> int:
    from .video import VIDEO_FORMATS, read_settings
    settings = read_settings(args.file)
    details = {}
    if Path(args.file).suffix.lower() in VIDEO_FORMATS:
        import av
        with av.open(args.file) as container:
            stream = container.streams.video[0]
            details = {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                       "frames_in_file": stream.frames, "size_in_file": f"{stream.width}x{stream.height}",
                       "fps_in_file": float(stream.average_rate)}
    if args.json:
        print(json.dumps({"settings": settings, "file": details}, indent=2))
    else:
        for key, value in {**settings, **details}.items():
            print(f"{key:18s} {value}")
    return 0


def run_models(args) -> int:
    from .loading import cached_modelscope_snapshot, cached_snapshot, locate
    from .registry import KNOWN_MODELS
    rows = []
    for model in KNOWN_MODELS.values():
        kind, target = model.source.split(":", 1)
        if kind == "package":
            path, missing = locate(model.alias).path, None
        else:  # a hub's cache also tells what a partly downloaded model lacks
            path, missing = (cached_snapshot if kind == "hf" else cached_modelscope_snapshot)(target)
        rows.append({"alias": model.alias, "source": model.source,
                     "local_path": str(path) if path and not missing else None, "missing": missing or [],
                     "defaults": model.defaults.as_dict(), "description": model.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        d = row["defaults"]
        where = row["local_path"] or "not downloaded"
        if row["missing"]:
            where = f"partly downloaded, missing {', '.join(row['missing'])}: `vidsynth download {row['alias']}` resumes"
        print(f"{row['alias']:20s} {d['frames']} frames {d['width']}x{d['height']}, {d['steps']} steps  "
              f"[{where}]\n{'':20s} {row['description']}")
    return 0


def run_download(args) -> int:
    from .devices import DTYPES, dtype_name, resolve_device, resolve_dtype
    from .loading import locate
    dtype = DTYPES.get(args.dtype) or dtype_name(resolve_dtype("auto", resolve_device("auto")))  # auto needs torch
    print(locate(args.model, half_precision=dtype in ("float16", "bfloat16")).path)
    return 0


def run_eval(args) -> int:
    if args.prompts < 1 or not 1 <= args.seeds <= MAX_VIDEOS:
        raise UsageError(f"--prompts must be at least 1 and --seeds 1-{MAX_VIDEOS}")
    settings = {name: getattr(args, name) for name in ("steps", "guidance", "guidance_fraction", "scheduler", "preset")
                if getattr(args, name) is not None}
    # Checked as the evaluation's requests will be, before the model loads rather than after.
    GenerationRequest.create(prompt="", allow_empty_prompt=True, seed=args.seed, **settings)
    from .files import check_file_path
    if args.json_path:
        check_file_path(args.json_path)  # now, not after minutes of evaluating
    _before_loading(args.model, args)
    from .evaluate import default_specs, evaluate, format_table, write_json
    from .pipeline import load
    from .progress import ProgressBar

    pipeline = load(args.model, **_runtime(args))
    with ProgressBar() as bar:
        summary = evaluate(pipeline, default_specs(args.prompts), args.seeds, base_seed=args.seed, callback=bar,
                           **settings)
    print(f"model {pipeline.name}, {args.prompts} held-out captions x {args.seeds} seeds (from seed {args.seed})")
    print(format_table(summary))
    if args.json_path:
        write_json(summary, Path(args.json_path))
    return 0


def run_serve(args) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the server needs {' and '.join(missing)}, which vidsynth's server extra installs: "
                         f"pip install 'vidsynth[server]'")
    from .server import ServerSettings, check_can_listen, is_loopback, serve
    if not is_loopback(args.host) and not args.token and not args.allow_remote_without_token:
        raise UsageError(f"refusing to serve on {args.host} without a token: set --token (or VIDSYNTH_TOKEN), bind "
                         f"127.0.0.1, or pass --allow-remote-without-token")
    if args.max_queue < 1 or args.keep_jobs < 1:
        raise UsageError("--max-queue and --keep-jobs must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    check_can_listen(args.host, args.port)
    settings = ServerSettings(data_dir=Path(args.data_dir), model=args.model, runtime=_runtime(args), token=args.token,
                              max_queue=args.max_queue, keep_jobs=args.keep_jobs)
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is a file; give a folder for the server's jobs and videos")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --data-dir {args.data_dir}: {exc.strerror or exc}") from None
    from .jobs import JobStore
    JobStore(settings.data_dir).close()  # a job database it cannot use is refused now, not after the model loads
    # Loaded here rather than as the app starts, so that a model that cannot load is reported as every command
    # reports errors, not as a traceback from the server's start-up.
    _before_loading(args.model, args)
    from .pipeline import load
    serve(settings, host=args.host, port=args.port, pipeline=load(args.model, **settings.runtime))
    return 0


def run_train(args) -> int:
    _before_loading(args.init, args, announce=args.init is not None)
    from .train import CHECKPOINT, TrainOptions, train
    options = TrainOptions(out=Path(args.out), architecture=args.architecture, init=args.init, data=args.data,
                           steps=args.steps, vae_steps=args.vae_steps, text_steps=args.text_steps,
                           new_text_encoder=args.new_text_encoder, batch_size=args.batch_size, lr=args.lr,
                           pure_noise_fraction=args.pure_noise_fraction,
                           checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                           precision=args.precision, device=args.device, workers=args.workers, seed=args.seed,
                           resume=args.resume)
    try:
        path = train(options)
    except KeyboardInterrupt:
        checkpoint = Path(args.out) / CHECKPOINT
        if not checkpoint.is_dir():
            raise
        return _fail(f"interrupted; {checkpoint} holds the training so far: run the same command to resume", 130)
    print(f"model written to {path} (use it with --model {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    entry_point()
