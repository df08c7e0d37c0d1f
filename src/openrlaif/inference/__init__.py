"""How a model produces text, for judges and rollouts alike.

- `http`: the OpenAI-compatible HTTP client (`OpenAIClient`): concurrency, retries, a fleet of
  servers, the API key. The OpenAI judge and the server samplers each hold one.
- `local`: sampling in process with transformers, one seed per sample (`sample`, `iter_samples`).
- `server`: sampling through a server (`ServerSampler`), and RL's rollouts as token ids with the
  weight reload that keeps the server's policy the trainer's (`RolloutSampler`,
  `sample_from_server`).
- `errors`: `GenerationError`, what sampling raises.

This layer sits above models and below judges: it imports nothing from judges, labeling,
training, evaluation, pipeline or the CLI.
"""
