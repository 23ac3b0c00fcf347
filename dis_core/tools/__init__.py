"""Layer 6, the tools on top: the command line (`cli`, `inference_cli`), trained models
(`inference`: `dis_core.load`), `dis compare`, `dis study` (`study`, `study_file`, `study_report`), `dis bench` and the plugin author's `dis check` /
`dis show` (`kit`).
"""
