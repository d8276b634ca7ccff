"""The guardian: what undoes oomguard's holds when the handler dies or stalls.

`keeper.py` is the guardian process itself (standard library only, memory
locked, no imports after start); `link.py` is the handler's side: start it,
tell it about every hold before it is made, beat while an incident is open.
"""

from oomguard.guardian.link import GuardianLink, guardian_report_path, undo_of

__all__ = ["GuardianLink", "guardian_report_path", "undo_of"]
