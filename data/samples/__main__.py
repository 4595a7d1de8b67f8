from align.data.samples import main

main()
