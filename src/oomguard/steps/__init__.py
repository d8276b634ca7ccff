"""The steps an incident composes: one module per kind of step.

Each step is a function `step(ctx)` (context.py: the step contract) that starts its
work and ends it with `ctx.done(Outcome...)`, at once or later from the loop when a
victim exits or a timer fires. Every change to the system goes through the ledger in
the context, which records it before making it. No step module imports the engine or
the incident (tests/test_step_contract.py); runner.py runs them.
"""
