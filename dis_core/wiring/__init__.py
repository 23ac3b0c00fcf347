"""Layer 2, the wiring: from installed plugins and a TOML file to built components.

Plugin loading (`plugins`) fills a flat registry (`registry`); a recipe is read, merged and
checked (`recipe`, with `config`'s strict converter and `deepspeed_table`'s batch rules) and its
components are built in slot order (`build`). Imports the contract only.
"""
