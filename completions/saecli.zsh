#compdef saecli

_saecli_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _SAECLI_COMPLETE=complete_zsh saecli)
}

compdef _saecli_completion saecli