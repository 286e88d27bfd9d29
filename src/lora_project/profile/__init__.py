"""Child-language profile of corpora and of adapters' samples (``lora-project profile``).

metrics: pure measures (MLU, MATTR, Brown stage, JS divergence, novelty); sources: corpora
from datasets, text files and CHAT transcripts; sample: seeded utterances from base and
adapters; report: the command's workflow, files, plot and table.
"""
