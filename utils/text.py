"""How numbers read in the lines the scripts print."""
from __future__ import annotations


def duration(seconds: float) -> str:
    """'45 s', '12 minutes', '1.5 hours'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"
