"""`distil publish`: a Hub-ready folder and model card for each exported model, and its upload.

    distil publish run_dir=runs/exp1                      # dry run: writes publish/<name>/, lists what would go up
    distil publish run_dir=runs/exp1 'publish.models=[sst2]' publish.repo_id=me/distilbert-sst2 publish.dry_run=false

For each model of the run's export stage (`publish.models`, default all), `<run_dir>/publish/<name>/` gets the
PyTorch weights, config and tokenizer, the ONNX variants that parity did not mark `not_recommended`, parity.json,
and `README.md`: the model card (deploy/card.py), every figure read from the run's files, checked against them
after it is written. A dry run (the default) prints the files that would be uploaded. With
`publish.dry_run=false` each folder goes to `publish.repo_id` (`{name}` in it names each model) through
huggingface_hub (`create_repo`, then `upload_folder`; the token from HF_TOKEN or `hf auth login`). A failed upload
is one `error:` line, exit 2, and the stage is left failed: no manifest says pushed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.deploy.card import build_card, check_card
from distilbert_cli.errors import UsageError, first_line
from distilbert_cli.rundir import Run
from distilbert_cli.schema import Publish

log = logging.getLogger(__name__)


def chosen_models(cfg: Publish, run_dir: Run) -> list[str]:
    """`publish.models` (default: every exported model), each one the export stage has, with its repository."""
    run_dir.require(artifacts.EXPORT)
    exported = artifacts.exported_models(run_dir)
    names = list(exported) if cfg.publish.models is None else [str(name) for name in cfg.publish.models]
    if missing := [name for name in names if name not in exported]:
        raise UsageError(f"publish.models names {missing}, which the export stage of {cfg.run_dir} does not have "
                         f"(it has {sorted(exported)})")
    if not names:
        raise UsageError("publish.models is empty: name the exported models to publish")
    if cfg.publish.repo_id is not None and len(names) > 1 and "{name}" not in cfg.publish.repo_id:
        raise UsageError(f"publish.repo_id={cfg.publish.repo_id!r} would receive {len(names)} models: name each with "
                         "{name}, e.g. me/distil-{name}, or publish one model (publish.models=[...])")
    return names


def assemble(name: str, run_dir: Run, out: Path) -> list[Path]:
    """Copy the export's PyTorch files, its recommended ONNX variants and parity.json into `out`; the files."""
    exported = artifacts.ExportedModel(run_dir.stage_dir(artifacts.EXPORT) / name)
    facts = artifacts.exported_models(run_dir)[name]
    out.mkdir(parents=True)
    for path in sorted(exported.path.iterdir()):
        if path.is_file():
            shutil.copy2(path, out / path.name)
    for variant in facts["variants"]:
        if variant not in facts["not_recommended"]:
            shutil.copytree(exported.path / variant, out / variant)
    return sorted(path for path in out.rglob("*") if path.is_file())


def upload(folder: Path, repo_id: str, cfg: Publish) -> str:
    """create_repo then upload_folder; any failure (no network, no token, no rights) is one UsageError line."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=cfg.publish.private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   commit_message=cfg.publish.commit_message)
    except Exception as exc:  # huggingface_hub raises HTTP, connection, offline-mode and token errors alike
        raise UsageError(f"cannot upload {folder} to the Hub repository {repo_id}: {type(exc).__name__}: "
                         f"{first_line(exc)}") from exc
    return str(getattr(commit, "commit_url", commit))


def run(cfg: Publish, overrides: Sequence[str] = ()) -> dict:
    """Assemble each model's folder and card; upload unless dry_run. Returns {name: its files, repo, url}."""
    run_dir = Run.of(cfg)
    names = chosen_models(cfg, run_dir)
    published = {}
    with run_dir.open_stage(artifacts.PUBLISH, cfg, overrides) as stage:
        stage.use_stage(artifacts.EXPORT)
        for name in names:
            folder = stage.path / name
            files = assemble(name, run_dir, folder)
            card = folder / artifacts.MODEL_CARD
            build_card(name, run_dir, cfg.publish.license, list(cfg.publish.datasets)).save(card)
            check_card(card, name, run_dir)
            files = sorted([*files, card])
            repo_id = None if cfg.publish.repo_id is None else cfg.publish.repo_id.format(name=name)
            published[name] = {"files": [str(path.relative_to(folder)) for path in files],
                               "bytes": sum(path.stat().st_size for path in files), "repo_id": repo_id}
            what = f"to {repo_id}" if repo_id else "(no publish.repo_id)"
            log.info("%s: %d files, %.1f MB %s %s:\n%s", name, len(files), published[name]["bytes"] / 2**20,
                     "would be uploaded" if cfg.publish.dry_run else "uploading", what,
                     "\n".join(f"  {path.relative_to(folder)}  ({path.stat().st_size:,} bytes)" for path in files))
        pushed = {}
        if not cfg.publish.dry_run:
            for name, entry in published.items():
                pushed[name] = upload(stage.path / name, entry["repo_id"], cfg)
                log.info("%s pushed: %s", name, pushed[name])
        stage.update(dry_run=bool(cfg.publish.dry_run), models=published, pushed=pushed)
    return {name: {**entry, "pushed": pushed.get(name)} for name, entry in published.items()}
