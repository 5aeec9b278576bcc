"""`reelflow demo`: the main job on the embedded default, every artefact under one local folder.

Today it generates a labelled corpus (with a few broken files) and runs the clip dataflow over it on
local Ray; training, tagging and the daily report join it as those jobs land.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.clips import ClipConfig
from jobs import clips, make_corpus
from jobs.runtime import console


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo keeps its state and how big a corpus it makes."""

    workdir: str = "reelflow-demo"
    videos: int = 48
    broken: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.videos < 1:
            raise ValueError(f"demo: videos={self.videos} must be >= 1")


def main(config: DemoConfig) -> clips.ClipsSummary:
    """Generate a corpus, then decode it into clips and an errors table."""
    workdir = Path(config.workdir).resolve()
    corpus = workdir / "corpus"
    console.rule("[bold]reelflow demo")
    console.print(f"all state in {workdir}")

    if not (corpus / "labels.parquet").exists():
        console.print(f"[bold]1/2[/] generating {config.videos} labelled videos (+{config.broken} broken)")
        make_corpus.main(
            make_corpus.CorpusConfig(
                out=str(corpus), videos=config.videos, seed=config.seed, broken=config.broken
            )
        )
    else:
        console.print(f"[bold]1/2[/] corpus already in {corpus}")

    console.print("[bold]2/2[/] decoding 16-frame clips at 112x112 on local Ray")
    summary = clips.main(
        clips.ClipsJobConfig(
            corpus=str(corpus),
            out=str(workdir / "clips"),
            clips=ClipConfig(clip_len=16, size=(112, 112), sampling="uniform", clips_per_video=4, audio=True),
        )
    )
    console.print(f"clips in {workdir / 'clips' / 'clips'}, errors in {workdir / 'clips' / 'errors'}")
    return summary
