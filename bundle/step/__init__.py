"""The learned step: `RuleConfig`, the one feature vocabulary, the torch reference, parameter roles, the CPU fast
path and `LearnedOptimizer` with its back-end dispatch. Imports only `optbundle.files` below it."""
