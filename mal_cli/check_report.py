"""`mal check`'s report: every problem of an input grouped by kind, each with a count and the first examples.

The kinds and their severities are listed in `KINDS`; see `mal_cli.check` for what each severity means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mal_cli.errors import InputError

EXAMPLES = 5

# code -> (severity, title, what to do)
KINDS: dict[str, tuple[str, str, str]] = {
    "unreadable": ("error", "file cannot be read or parsed", "fix the path, or regenerate / repair the JSON"),
    "layout": (
        "error",
        "not a COCO/LVIS dataset or results list",
        "give an instances JSON with 'images' and 'annotations'",
    ),
    "image_not_object": ("error", "image record is not a JSON object", "every entry of 'images' must be an object"),
    "image_bad_id": ("error", "image without a usable 'id'", "give every image a unique integer 'id'"),
    "duplicate_image_id": ("error", "duplicate image id", "image ids must be unique"),
    "image_no_file": ("error", "image without 'file_name' or 'coco_url'", "add 'file_name' to the image record"),
    "ann_not_object": ("error", "annotation is not a JSON object", "every entry of 'annotations' must be an object"),
    "ann_missing_key": ("error", "annotation without a required key", "annotations need 'id', 'image_id' and 'bbox'"),
    "ann_bad_id": ("error", "annotation with an unusable 'id'", "give every annotation a unique integer 'id'"),
    "duplicate_annotation_id": ("error", "duplicate annotation id", "annotation ids must be unique"),
    "unknown_image": (
        "error",
        "annotation refers to an image id not in 'images'",
        "add the image or drop the annotation",
    ),
    "bbox_not_list": (
        "error",
        "'bbox' is not a list [x, y, width, height]",
        "write boxes as COCO [x, y, width, height]",
    ),
    "bbox_not_number": ("warning", "bbox value is not a number", "the box gets the empty fallback (degenerate_box)"),
    "bbox_not_finite": ("warning", "bbox has NaN or infinity", "the box gets the empty fallback (degenerate_box)"),
    "bbox_empty": (
        "warning",
        "bbox has zero or negative width/height",
        "the box gets the empty fallback (degenerate_box)",
    ),
    "bbox_outside": ("warning", "bbox lies outside its image", "the box gets the empty fallback (degenerate_box)"),
    "bbox_exceeds_image": (
        "warning",
        "bbox extends past the image border (> 1 px)",
        "the mask is clipped to the image",
    ),
    "image_bad_size": (
        "warning",
        "image without a positive integer 'height'/'width'",
        "the size is read from the file (mal train needs it)",
    ),
    "unknown_category": (
        "warning",
        "annotation of a category not in 'categories'",
        "add the category (AP evaluation needs it)",
    ),
    "image_missing": (
        "warning",
        "image file missing on disk",
        "its boxes get the filled-box fallback (image_error); check --images",
    ),
    "image_unreadable": (
        "warning",
        "image file cannot be decoded",
        "its boxes get the filled-box fallback (image_error); replace the file",
    ),
    "image_size_mismatch": (
        "warning",
        "image file size differs from the recorded height/width",
        "its boxes get the filled-box fallback (image_error)",
    ),
}


@dataclass
class Group:
    code: str
    count: int = 0
    examples: list = field(default_factory=list)

    @property
    def severity(self) -> str:
        return KINDS[self.code][0]


@dataclass
class CheckReport:
    """All problems of one input, grouped by kind (insertion order = order of first occurrence)."""

    source: str
    groups: dict = field(default_factory=dict)
    images: int = 0
    annotations: int = 0
    kind: str = "dataset"  # dataset | results
    images_checked_on_disk: int = 0
    # (image id, file name, recorded (h, w) or None) of every image with a usable id: what `check_image_files` checks
    image_files: list = field(default_factory=list)

    def add(self, code: str, where: str) -> None:
        if where.startswith(self.source + ": "):  # the report names its file once
            where = where[len(self.source) + 2 :]
        group = self.groups.get(code)
        if group is None:
            group = self.groups[code] = Group(code)
        group.count += 1
        if len(group.examples) < EXAMPLES:
            group.examples.append(where)

    def add_counted(self, code: str, examples: list, count: int) -> None:
        """`count` problems of kind `code`, `examples` being the first of them (the rest are only counted)."""
        if not count:
            return
        for where in examples:
            self.add(code, where)
        self.groups[code].count += count - len(examples)

    def count(self, severity: str) -> int:
        return sum(g.count for g in self.groups.values() if g.severity == severity)

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def clean(self) -> bool:
        return not self.groups

    def summary(self, severity: Optional[str] = None) -> str:
        """One line: every group of `severity` with its count and first examples."""
        parts = []
        for code, group in self.groups.items():
            if severity is not None and group.severity != severity:
                continue
            more = ", ..." if group.count > len(group.examples) else ""
            parts.append(f"{KINDS[code][1]} x{group.count} ({'; '.join(group.examples[:3])}{more})")
        return "; ".join(parts)

    def raise_errors(self) -> None:
        """Stop with one line listing every error group, when there is any."""
        if self.errors:
            raise InputError(
                f"{self.source}: {self.errors} problem(s) make the input unusable: {self.summary('error')}. "
                f"Fix them (`mal check {self.source}` lists them all) and rerun"
            )

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "images": self.images,
            "annotations": self.annotations,
            "images_checked_on_disk": self.images_checked_on_disk,
            "errors": self.errors,
            "warnings": self.warnings,
            "clean": self.clean,
            "problems": [
                {
                    "code": c,
                    "severity": g.severity,
                    "title": KINDS[c][1],
                    "hint": KINDS[c][2],
                    "count": g.count,
                    "examples": g.examples,
                }
                for c, g in self.groups.items()
            ],
        }

    def text(self) -> str:
        what = "records" if self.kind == "results" else "annotations"
        head = (
            f"mal check: {self.source}: {self.errors} error(s), {self.warnings} warning(s) "
            f"({self.images} images, {self.annotations} {what}"
        )
        head += f", {self.images_checked_on_disk} image files checked)" if self.images_checked_on_disk else ")"
        lines = [head]
        for severity in ("error", "warning"):
            for code, group in self.groups.items():
                if group.severity != severity:
                    continue
                _, title, hint = KINDS[code]
                lines.append(f"  {severity:7s} {title}: {group.count}  [{code}] -> {hint}")
                for example in group.examples:
                    lines.append(f"            {example}")
                if group.count > len(group.examples):
                    lines.append(f"            ... and {group.count - len(group.examples)} more")
        if self.clean:
            lines.append("  no problems found")
        return "\n".join(lines)
