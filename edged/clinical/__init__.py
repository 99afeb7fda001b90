"""Clinical policy over plain data: vitals state, NEWS2 and red flags, prompts, the advice guard.

Import the submodules directly (`from edged.clinical.news2 import score_news2`); this package
imports nothing itself, so loading one piece of policy never drags in the others.
"""
