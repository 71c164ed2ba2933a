from molmo_fast.study.cli import main

main()
