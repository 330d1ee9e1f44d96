"""queen-rbee: the OpenAI API, the worker registry, scheduling and the job API. The one decision-maker."""
