"""Evaluation (DESIGN §2.7): policy A against policy B as a judge sees it, and hybrid human/AI feedback.

- `winrate`: win rate with ties and a bootstrap CI, length-controlled win rate, harmless rate, lengths;
- `evaluate`: sample, judge both orders, score each response alone; writes eval.json and samples.jsonl;
- `human`: export the least confident AI labels for people, import their labels over the AI's;
- `report/`: the run report, one self-contained HTML file and the same headline in the terminal.

Their commands (`openrlaif eval`, `human export|import`, `report`) are in `openrlaif.cli.evaluate`.
"""
