"""fetch: read FER2013 from wherever it is and write the canonical raw table, plus the optional source domain.

Reads:   params.yaml `fetch` (source, sha256, source_domain, source_domain_size, source_domain_per_class)
         and `seed` (which source-domain train images are kept); the FER2013 source named by
         fetch.source (for `auto`: $DLFER_FER2013, data/external/, the kagglehub cache; see
         dlfer.data.sources) and the ImageNet-layout set named by fetch.source_domain (for `auto`:
         $DLFER_SOURCE_DOMAIN, then data/external/imagenette*.zip).
Writes:  --out                data/raw/fer2013.parquet, one row per image (CONTEXT.md schema)
         --source-domain-out  data/raw/source_domain.npz; when fetch.source_domain is "" or `auto`
                              finds nothing, it is still written, with zero-length arrays and no
                              class names, so the DVC out always exists
         --metrics            metrics/fetch.json: counts per usage and class, the source (kind,
                              origin, checkout-relative location, sha256 of the zip or csv);
                              the seconds it took go to MLflow only
MLflow:  run "fetch" with params fetch.* and seed, the numeric metrics, the source as tags and
         metrics/fetch.json as an artifact.
A missing or malformed source stops with one line `fetch: <message>` on stderr and exit code 2,
before anything is written, so earlier outputs stay as they were. An unreachable MLflow store stops
it the same way (exit code 1), before the source is even read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dlfer.data import sources
from dlfer.fer2013 import EMOTIONS, USAGES
from dlfer.files import write_json
from dlfer.params import ParamsError, load_params
from dlfer.tracking import configure, repository_root, stage_run


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/raw/fer2013.parquet")
    parser.add_argument("--source-domain-out", default="data/raw/source_domain.npz")
    parser.add_argument("--metrics", default="metrics/fetch.json")
    return parser.parse_args(argv)


def fetch(arguments: argparse.Namespace) -> dict:
    """Read everything first and write only then, so a bad input leaves every earlier output untouched."""
    params = load_params(arguments.params)
    configure()  # fail fast on an unreachable tracking store, before any work
    fetch_params = params.fetch
    # data/external/ and relative paths belong to the user's checkout, also inside a queued `dvc exp run` copy.
    root = repository_root()
    started = time.perf_counter()
    with sources.open_fer2013_source(fetch_params.source, fetch_params.sha256, root) as source:
        table = sources.read_fer2013(source)
    fer2013_seconds = time.perf_counter() - started

    started = time.perf_counter()
    domain_path, domain_origin = sources.resolve_source_domain(fetch_params.source_domain, root)
    if domain_path is None:
        domain = sources.empty_source_domain(fetch_params.source_domain_size)
    else:
        domain = sources.read_source_domain(domain_path, fetch_params.source_domain_size,
                                            fetch_params.source_domain_per_class, params.seed)
    domain_seconds = time.perf_counter() - started

    # A checkout-relative name where it can be one: the same copy reads the same on every machine.
    location = sources.portable_location(source.location, root)
    sources.write_canonical_table(table, arguments.out, source=location)
    sources.write_source_domain(domain, arguments.source_domain_out)
    class_counts = table.groupby(["usage", "emotion"]).size()
    metrics = {
        "images": len(table),
        "usage": {usage: int((table["usage"] == usage).sum()) for usage in USAGES},
        "class": {usage: {emotion: int(class_counts.get((usage, emotion), 0)) for emotion in EMOTIONS}
                  for usage in USAGES},
        "channels": {str(channels): int(count) for channels, count in table["channels"].value_counts().items()},
        "source": {
            "kind": source.kind,
            "origin": source.origin,
            "location": location,
            "sha256": source.sha256 or None,
        },
        "source_domain": {
            "location": sources.portable_location(str(domain_path or ""), root),
            "origin": domain_origin,
            "classes": len(domain["class_names"]),
            "train_images": len(domain["train_images"]),
            "val_images": len(domain["val_images"]),
        },
    }
    write_json(arguments.metrics, metrics)
    # How long it took differs between runs: MLflow only, never the DVC metrics file.
    timings = {"seconds": round(fer2013_seconds, 3), "source_domain.seconds": round(domain_seconds, 3)}

    with stage_run("fetch", {"fetch": params.section("fetch"), "seed": params.seed}):
        import mlflow

        mlflow.log_metrics({**numeric_leaves(metrics), **timings})
        mlflow.set_tags({f"source.{key}": str(value) for key, value in metrics["source"].items()})
        mlflow.set_tag("source.path", source.location)
        mlflow.log_artifact(str(arguments.metrics))
    return {**metrics, **timings}


def numeric_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics dict under dotted names (MLflow metrics take numbers only)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(numeric_leaves(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        metrics = fetch(arguments)
    except (sources.FetchError, ParamsError) as error:
        print(f"fetch: {error}", file=sys.stderr)
        return 2
    print(f"fetch: {metrics['images']} images from {metrics['source']['location']} ({metrics['source']['kind']}) "
          f"in {metrics['seconds']:.1f} s -> {Path(arguments.out)}; source domain: "
          f"{metrics['source_domain']['train_images']} train / {metrics['source_domain']['val_images']} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
