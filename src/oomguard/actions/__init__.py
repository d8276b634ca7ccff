"""The moderate actions an incident composes: one module per kind of change.

Each step is a function `(incident, step, done)` that starts its work and calls
`done(result)` when finished (at once, or later from the loop when a victim
exits or a timer fires). Every change to the system goes through the incident's
ledger, which records it before making it.
"""
