from sllm.cli import main

main()
