"""The fine-tuning job service: the SQLite store, the job lifecycle, the runner that trains a
job a time slice at a time, and OpenAI's hyperparameter rules. Imports nothing from SGLang."""
