"""Research harnesses on top of the language-model family: teacher hacking (S21) and distillation-source
analysis of traces (S19, S51). Not imported by the plug-in: the CLI imports them on demand."""
