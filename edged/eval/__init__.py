"""`edged model eval`: how good a model directory is, measured the same way for every export.

Perplexity on held-out dialogues (the assistant's turn, given the prompt), multiple-choice
accuracy (each option scored by its log-likelihood), agreement with a reference model
directory (top-1 and KL of next-token distributions, teacher-forced), and for dialogue sets
what the answers say: do they cite the abnormal vitals, carry the escalation when one is due,
and contradict the triage before and after the guard.
"""
