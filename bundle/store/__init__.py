"""Storage: `LearnedRule` with its files, `Bundle`, model cards, the Hub, the Trainer glue and the shipped rules
(`pretrained/`). Imports `optbundle.step` and `optbundle.files` below it."""
