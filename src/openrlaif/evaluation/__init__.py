"""Evaluation (DESIGN §2.7): policy A against policy B as a judge sees it, and hybrid human/AI feedback.

- `winrate`: win rate with ties and a bootstrap CI, length-controlled win rate, harmless rate, lengths;
- `evaluate`: sample, judge both orders, score each response alone; writes eval.json and samples.jsonl;
- `human`: export the least confident AI labels for people, import their labels over the AI's;
- `commands`: `openrlaif eval` and `openrlaif human export|import`.
"""
