"""`mal bench`'s table."""

from __future__ import annotations


def bench_table(result: dict):
    from rich.table import Table

    cpu = f" ({result.get('cpu_model')}, {result.get('cpu_count')} cores)" if result.get("cpu_model") else ""
    table = Table(
        title=f"mal bench: {result['boxes']} boxes, {result['images']} images, device {result['device']}{cpu}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    _end_to_end_rows(table, result)
    if "pipeline" in result:
        _pipeline_rows(table, result["pipeline"])
    _stage_rows(table, result)
    if "model" in result:
        _model_rows(table, result["model"])
    if "train" in result:
        _train_rows(table, result["train"])
    if "peak" in result:
        _peak_rows(table, result)
    return table


def _end_to_end_rows(table, result: dict) -> None:
    """`mal label` timed end to end, per method."""
    for method, e2e in result.get("end_to_end", {}).items():
        table.add_row(
            f"end to end --method {method}{', ' + e2e['precision'] if e2e.get('precision') else ''}: boxes/s "
            "(in run / with start-up)",
            f"{e2e['boxes_per_s']} / {e2e['boxes_per_s_wall']}",
        )
        table.add_row(f"end to end --method {method}: peak RSS", f"{e2e['peak_rss_mib']} MiB")


def _pipeline_rows(table, p: dict) -> None:
    """The label pipeline with a zero-cost model stand-in."""
    table.add_row(
        "pipeline alone (--method mal, zero-cost model stand-in): boxes/s (in run / in loop)",
        f"{p['boxes_per_s']} / {p['boxes_per_s_in_loop']}",
    )
    table.add_row(
        "pipeline CPU ms/box: main process in loop (serial) / workers (divide over the cores)",
        f"{p['main_cpu_ms_per_box']} / {p['workers_cpu_ms_per_box']}",
    )
    table.add_row("  main-process ceiling: boxes/s on any device", str(p["main_process_ceiling_boxes_per_s"]))


def _stage_rows(table, result: dict) -> None:
    """Serial per-stage timings, per method."""
    for method, st in result.get("stages", {}).items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in st["ms_per_box"].items() if v)
        table.add_row(f"stages --method {method} (ms/box, serial, {st['boxes']} boxes)", parts)


def _model_rows(table, m: dict) -> None:
    """The model alone: throughput and FLOPs."""
    sizes = ",".join(str(v) for v in m["crop_sizes"])
    compiled = f", compiled in {m['seconds_warmup']:.1f} s" if m.get("compile") else ""
    table.add_row(
        f"model alone (crops {sizes}, batch {m['batch_size']}, {m.get('precision')}{compiled}): boxes/s",
        str(m["boxes_per_s"]),
    )
    table.add_row(
        "model GFLOP/box (batch mix; the exact model: full crop, trained decoder)",
        f"{m['gflop_per_box']} ({m['gflop_per_box_full_crop']})",
    )
    for route, f in m["gflop_per_box_by_route"].items():
        table.add_row(
            f"  route {route}, crop {f['crop_size']}, decoder x{f['decoder_scale']:g}: encoder + decoder GFLOP/box",
            f"{f['encoder_gflop']} + {f['decoder_gflop']}",
        )
    table.add_row("model achieved TFLOP/s", str(m["tflop_per_s"]))


def _train_rows(table, t: dict) -> None:
    """Training throughput, memory, FLOPs and the step split."""
    weights = "random" if t["backbone_weights"] == "random" else "file"
    table.add_row(
        f"train ({t['backbone']}, {weights} weights, crop {t['crop_size']}, batch {t['batch_size']}, "
        f"{t['workers']} workers): samples/s steady (steps {t['steady_from_step']}-{t['steady_to_step']})",
        str(t["samples_per_s_steady"]),
    )
    table.add_row(
        f"train: samples/s overall ({t['steps']} steps in {t['seconds_in_loop']:.2f} s; "
        f"wall {t['seconds_wall']:.1f} s)",
        str(t["samples_per_s_overall"]),
    )
    memory = f"{t['peak_rss_mib']} MiB"
    if "gpu_peak_allocated_mib" in t:
        memory += f"; GPU {t['gpu_peak_allocated_mib']} MiB allocated"
    table.add_row("train: peak RSS", memory)
    if "gflop_per_sample" in t:
        table.add_row("train GFLOP/sample (student fwd + bwd + teacher fwd)", str(t["gflop_per_sample"]))
        table.add_row("train achieved TFLOP/s (steady)", str(t["tflop_per_s"]))
    if "split" in t:
        sp = t["split"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sp["ms_per_step"].items())
        table.add_row(f"train step split (ms/step, serial, median of {sp['steps']})", parts)
        table.add_row(
            f"train: compute alone / loader alone ({sp['workers']} workers): samples/s",
            f"{sp['compute_samples_per_s']} / {sp['loader_samples_per_s']}",
        )
    if t.get("skipped_nonfinite"):
        table.add_row("train: steps skipped (non-finite loss)", str(t["skipped_nonfinite"]))


def _peak_rows(table, result: dict) -> None:
    """Matmul peak and the fractions of it reached."""
    table.add_row(
        f"bf16 / fp32 matmul peak TFLOP/s (n={result['peak']['matmul_n']})",
        f"{result['peak']['tflop_per_s']} / {result['peak'].get('fp32_tflop_per_s')}",
    )
    if "model" in result and "fraction_of_peak" in result["model"]:
        table.add_row("model / peak", f"{100 * result['model']['fraction_of_peak']:.1f} %")
    if "fraction_of_peak" in result.get("train", {}):
        table.add_row("train / peak", f"{100 * result['train']['fraction_of_peak']:.1f} %")
