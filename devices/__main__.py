from devices.cli import main

main()
