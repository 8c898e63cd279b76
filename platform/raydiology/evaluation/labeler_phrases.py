"""Phrase and cue lists for the rule-based CheXpert-style report labeler (`labeler.py`).

Everything here is a regular-expression fragment matched against lower-cased, whitespace-
normalised report text. Fragments start at a word boundary (added by the labeler) and may end
open ("atelecta" also finds "atelectatic"), so a list reads like a radiologist's vocabulary
rather than like code. The coverage follows the observations, phrase families and cue kinds of
the CheXpert labeler (Irvin et al. 2019, MIT), written anew for a regex engine: CheXpert finds
scope on a dependency parse, this labeler on word windows inside a clause.
"""

from __future__ import annotations

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# Findings that are not one of the 14 columns but still make a report abnormal (they block
# "No Finding" when positive or uncertain, as in CheXpert).
OTHER = "Other Finding"

ECM, CARDIO = "Enlarged Cardiomediastinum", "Cardiomegaly"

# (fragment, observations it names, kind). kind "finding" names the abnormality itself;
# "anatomy" names a structure whose state the sentence gives ("the heart", "mediastinal
# contours"), and is what "stable"/"unchanged" make uncertain (a stable silhouette does not
# say whether it is enlarged); "hedge" names a sign that only suggests the observation
# ("vascular congestion" for edema): uncertain unless negated.
# Order matters only between fragments that start at the same place: the first wins.
MENTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # Enlarged cardiomediastinum / cardiomegaly
    (r"cardiomediastin\w*(?: silhouettes?| contours?)?", (ECM,), "anatomy"),
    (r"(?:widen\w*|enlarge\w*) (?:of the )?(?:upper )?mediastin\w*", (ECM,), "finding"),
    (r"mediastinal (?:widening|enlargement)", (ECM,), "finding"),
    (
        r"mediastinal (?:contours?|configuration|silhouettes?|width|shadow|structures)",
        (ECM,),
        "anatomy",
    ),
    (r"mediastinum", (ECM,), "anatomy"),
    (r"(?:pericardial|hilar) (?:silhouettes?|contours?)", (ECM,), "anatomy"),
    (r"cardiac silhouettes? and (?:pulmonary )?vascularity", (CARDIO, ECM), "anatomy"),
    (r"cardiac contours?", (CARDIO, ECM), "anatomy"),
    (r"contours?", (ECM,), "anatomy"),
    (r"cardiomegaly", (CARDIO,), "finding"),
    (r"(?:cardiac|heart) enlargement", (CARDIO,), "finding"),
    (r"enlarged (?:heart|cardiac silhouette)", (CARDIO,), "finding"),
    (r"cardiac (?:size|shadow|silhouettes?)", (CARDIO,), "anatomy"),
    (r"(?:the )?heart size", (CARDIO,), "anatomy"),
    (r"(?:the )?heart(?! failure)\b", (CARDIO,), "anatomy"),
    # Lung lesion
    (r"nodular (?:opacit(?:y|ies)|opacification)", ("Lung Lesion", "Lung Opacity"), "finding"),
    (r"nodular densit(?:y|ies)", ("Lung Lesion",), "finding"),
    (r"(?:micro)?nodul(?:e|es|i)\b", ("Lung Lesion",), "finding"),
    (r"masse?s?\b", ("Lung Lesion",), "finding"),
    (r"lumps?\b", ("Lung Lesion",), "finding"),
    (r"cavitary lesions?", ("Lung Lesion",), "finding"),
    (r"(?:carcinoma|neoplasm|tumou?r|malignan)\w*", ("Lung Lesion",), "finding"),
    # Lung opacity
    (r"opaci\w*", ("Lung Opacity",), "finding"),
    (r"decreased translucency|increased densit(?:y|ies)", ("Lung Opacity",), "finding"),
    (r"air[- ]?space (?:disease|process)", ("Lung Opacity",), "finding"),
    (r"infiltra\w*", ("Lung Opacity",), "finding"),
    (r"interstitial (?:markings?|pattern|lung disease|prominence)", ("Lung Opacity",), "finding"),
    (r"reticular (?:pattern|markings?)|reticulation", ("Lung Opacity",), "finding"),
    (r"(?:peribronchial|bronchial wall|wall) thickening", ("Lung Opacity",), "finding"),
    # Pleural other (before "scar" so that a pleural scar is not a lung opacity)
    (r"pleural thickening", ("Pleural Other",), "finding"),
    (r"pleur(?:al|o)[- ](?:parenchymal |pericardial )?scar\w*", ("Pleural Other",), "finding"),
    (r"fibro(?:sis|thorax|tic)", ("Pleural Other",), "finding"),
    (r"(?:parenchymal )?scar\w*", ("Lung Opacity",), "finding"),
    # Edema
    (r"(?:pulmonary |interstitial |alveolar )?edema", ("Edema",), "finding"),
    (r"(?:congestive )?heart failure|chf\b", ("Edema",), "finding"),
    (r"(?:pulmonary )?vascular (?:congestion|prominence|engorgement)", ("Edema",), "hedge"),
    (r"pulmonary (?:venous )?congestion", ("Edema",), "hedge"),
    (r"indistinct\w*", ("Edema",), "hedge"),
    # Consolidation, pneumonia, atelectasis
    (r"consolidat\w*", ("Consolidation",), "finding"),
    (r"(?:broncho)?pneumonia\w*", ("Pneumonia",), "finding"),
    (r"infectio\w*", ("Pneumonia",), "finding"),
    (r"atelecta\w*", ("Atelectasis",), "finding"),
    (r"collaps\w*", ("Atelectasis",), "finding"),
    # Pleural
    (r"(?:hydro)?pneumothora(?:x|ces)", ("Pneumothorax",), "finding"),
    (r"pleural fluid", ("Pleural Effusion",), "finding"),
    (r"effusions?\b", ("Pleural Effusion",), "finding"),
    (r"fractur\w*", ("Fracture",), "finding"),
    # Support devices
    (r"(?:pacer|pacemaker|defibrillator|icd|aicd)s?\b", ("Support Devices",), "finding"),
    (r"picc\w*|mediport|port-?a-?cath|(?:chest )?port\b", ("Support Devices",), "finding"),
    (
        r"(?:catheter|cannula|tube|valve|drain|stent|coil|clip|wire|lead)s?\b",
        ("Support Devices",),
        "finding",
    ),
    (r"lines?\b", ("Support Devices",), "finding"),
    (r"(?:support )?(?:devices?|apparatus|equipment|hardware)\b", ("Support Devices",), "finding"),
    (
        r"(?:arthroplast|sternotom)\w*|(?:surgical )?(?:plates?|screws?|markers?)\b",
        ("Support Devices",),
        "finding",
    ),
    # Other abnormal findings: not a column, but the report is not "No Finding".
    (
        r"emphysem\w*|blunt\w*|densit(?:y|ies)|elevat\w*|eventration|(?:levo|dextro|kypho)?scolio\w*"
        r"|degenera\w*|calcifi\w*|hyperinflat\w*|hyperexpan\w*|bronchospasm|asthma"
        r"|hernia\w*|copd|plaques?|osteophyt\w*|aortic disease|bronchiolitis"
        r"|airways? disease|thickening|cephali[sz]ation|aspiration|bullae?|bullous|contusion"
        r"|atherosclero\w*|osteopeni\w*|metasta\w*|granulom\w*|pneumomediastinum"
        r"|pneumoperitoneum|osteodystroph\w*|cuffing|irregular lucency|inflam\w*|fissur\w*"
        r"|hypertension|prominen\w*|kyphos\w*|bullets?|reticula\w*|thoracentesis|bronchitis"
        r"|volume loss|deformit\w*|hemorrhag\w*|hematoma|radiopaque|aerophagia|arthropath\w*"
        r"|tracheostomy|adenopathy|lymphadenopathy|tortuo\w*|ectatic|ectasia|dilat\w*"
        r"|bronchiectasis|pneumatocele|cavitation",
        (OTHER,),
        "finding",
    ),
)

# Text that looks like a mention but is not one; matched before the mentions at the same place.
SKIPS = (
    r"pericardial effusions?",
    r"calcified (?:nodul\w*|granulom\w*|lymph nodes?)",
    r"massive\w*|massengale",
    r"pleural lines?|septal lines?|kerley(?: b)? lines?|skin ?folds? lines?|line of",
    # A structure named only as a place ("overlying the heart") says nothing about its size.
    r"(?:over(?:lying|lies|lie)?|overly|in|behind|projects? over|projecting over) the "
    r"(?:superior |left |right )?(?:heart|cardiac silhouette|cardiac shadow|mediastinum"
    r"|cardiomediastin\w*(?: silhouette)?|mediastinal (?:contours?|silhouette))",
    r"heart rate",
    r"(?:size|caliber) and contours?|(?:ventricular|diaphragm\w*|rib|osseous|bony|skin) contours?"
    r"|contours? (?:irregularit\w*|deformit\w*|abnormalit\w*)",
    r"tuberculosis",
    r"sided heart",
)

# Cues: (fragment, kind, direction, window, restrict).
# kind: "neg" negation; "unc" uncertainty; "unc_first" uncertainty that outranks negation
#   ("cannot be excluded" contains a negation but leaves the finding possible); "pseudo"
#   consumes text that would otherwise read as a cue ("no change in").
# direction: "pre" applies to mentions after the cue, "post" to mentions before it, "both" to
#   either.
# window: most words allowed between cue and mention (None: the whole clause).
# restrict: "anatomy" limits the cue to anatomy mentions ("stable heart size").
# A clause ends at a sentence end or at a contrastive word ("but", "however").
# Listed most specific first: at one position the first cue that matches is taken.
CUES: tuple[tuple[str, str, str, int | None, str | None], ...] = (
    # uncertainty that outranks negation
    (
        r"(?:cannot|can not|could not|may not|not) (?:be )?(?:entirely |completely |totally )?"
        r"(?:excluded|ruled out)",
        "unc_first",
        "post",
        8,
        None,
    ),
    (
        r"(?:cannot|can not|could not|unable to|difficult to) (?:entirely |completely )?"
        r"(?:exclude|rule out)",
        "unc_first",
        "pre",
        None,
        None,
    ),
    (r"no evidence to rule out", "unc_first", "pre", None, None),
    (r"no new", "unc_first", "pre", None, None),
    # pseudo-cues: consume the words so they do not negate
    (
        r"no (?:significant |appreciable |substantial |definite |interval )*change"
        r"|without (?:significant |appreciable |interval )*change"
        r"|not (?:only|necessarily)|gram negative|no increase|no decrease|to (?:suggest|indicate)",
        "pseudo",
        "pre",
        0,
        None,
    ),
    # negation after the mention
    (
        r"(?:(?:is|are|was|were|has been|have been) )?(?:no longer|not) (?:definitely |clearly "
        r"|significantly |substantially |markedly |appreciably |grossly )?"
        r"(?:seen|identified|visuali[sz]ed|demonstrated|present|evident|noted|detected|visible"
        r"|apparent|enlarged|shown|recognized|observed)",
        "neg",
        "post",
        8,
        None,
    ),
    (
        r"(?:(?:is|are|was|were|has|have) )?(?:(?:now|since|completely|nearly) )?"
        r"(?:been )?(?:resolved|resolving|cleared|removed|withdrawn)",
        "neg",
        "post",
        6,
        None,
    ),
    (
        r"(?:is|are|was|were|remains?|appears?|looks?|seems?)(?: to be)?"
        r"(?: now| otherwise| again| also| still| stably| grossly| essentially| overall)?"
        r"(?: within| at)?(?: the)? (?:normal|unremarkable|top normal|top-normal"
        r"|upper (?:limits? )?(?:of )?normal|low normal|not enlarged|normal limits)",
        "neg",
        "both",
        8,
        "anatomy",
    ),
    (r"(?:is|are|was|were|remains?) (?:now )?(?:absent|negative)", "neg", "post", 8, None),
    (
        r"(?:of |in )?(?:top |upper |low )?normal (?:size|caliber|calibre|contour|configuration)"
        r"(?: and (?:size|contour|configuration))?(?: of)?(?: the)?",
        "neg",
        "both",
        3,
        "anatomy",
    ),
    (
        r"(?:(?:within|at|near) (?:the )?)?(?:upper|high|top)[- ](?:limits? )?(?:of )?normal"
        r"(?: (?:in |for )?(?:size|limits))?",
        "neg",
        "post",
        6,
        "anatomy",
    ),
    (
        r"(?:within|at) (?:the )?(?:upper )?(?:limits? of )?normal(?: limits)?",
        "neg",
        "post",
        6,
        "anatomy",
    ),
    (
        r"(?:top |upper |low )?(?:normal|unremarkable)(?: appearance of(?: the)?)?",
        "neg",
        "both",
        2,
        "anatomy",
    ),
    # uncertainty after the mention
    (
        r"(?:(?:may|might|could|can|would)(?: also| possibly| potentially)?"
        r"|(?:is|are) (?:possibly|probably|likely))(?: be| have| also be)?"
        r" (?:present|seen|noted|considered|possible|a consideration|contributing|contributory"
        r"|superimposed|developing|this appearance|related|appear)\b",
        "unc",
        "post",
        6,
        None,
    ),
    (
        r"(?:is|are|was|were) (?:also )?(?:suspected|questioned|possible|probable|questionable"
        r"|not excluded|in question|a consideration|considered)",
        "unc",
        "post",
        6,
        None,
    ),
    (
        r"(?:is|are|was|were) (?:poorly|incompletely|not well|not clearly|not) "
        r"(?:evaluated|visuali[sz]ed|assessed|seen|appreciated)|not (?:well |clearly )?"
        r"(?:evaluated|assessed|appreciated)|poorly (?:evaluated|visuali[sz]ed|seen)",
        "unc",
        "post",
        6,
        None,
    ),
    (r"(?:is|are) obscured|obscured|obscuration", "unc", "post", 3, None),
    (
        r"(?:is |are |appears? |remains? )?(?:stable|unchanged|similar to (?:the )?prior\w*"
        r"|not changed|without change)",
        "unc",
        "both",
        3,
        "anatomy",
    ),
    (r"\?", "unc", "post", 3, None),
    (r"(?:less|not) likely", "unc", "post", 2, None),
    # negation before the mention
    (
        r"no (?:evidence|signs?|findings?|features?|areas?|focus|foci|suggestion|definite"
        r"|definitive|obvious|convincing)(?: of| for| to suggest)?",
        "neg",
        "pre",
        None,
        None,
    ),
    (r"(?:without|w/o)(?: (?:evidence|signs?|findings?) (?:of|for))?", "neg", "pre", None, None),
    (r"(?:negative|free|clear|clearing) (?:for|of)", "neg", "pre", None, None),
    (
        r"(?:absence|resolution|removal|disappearance|resolving|history) of",
        "neg",
        "pre",
        None,
        None,
    ),
    (r"(?:rule out|r/o|to exclude|exclude|excluding|ruled out)", "neg", "pre", None, None),
    (r"no|none|neither|nor", "neg", "pre", None, None),
    (r"(?:absent|negative|clear)\b", "neg", "post", 0, None),
    (r"not|absent", "neg", "pre", 3, None),
    # uncertainty before the mention
    (
        r"(?:may|might|could|would|can)(?: also| possibly| potentially)? (?:represent|reflect|"
        r"indicate|include|be|suggest|relate|have|signify|correspond)",
        "unc",
        "pre",
        None,
        None,
    ),
    (
        r"(?:possibl|probabl|presumabl|questionabl)[ey]|presumed|maybe|perhaps|equivocal"
        r"|indeterminate|borderline|uncertain|suspect(?:ed)?|suspicio(?:us|n) (?:for|of)"
        r"|concern(?:ing)? (?:for|of)|worrisome (?:for|of)|(?:question|suggestion|possibility)"
        r" of|suggestive of|suggests?|differential(?: diagnosis)?(?: includes?| considerations?)?"
        r"|(?:versus|vs)\b|secondary to"
        r"|(?:correlate|correlation)(?: clinically)? (?:for|with|to)|could|may|might",
        "unc",
        "pre",
        None,
        None,
    ),
    (r"(?:obscur\w*)(?: the)?", "unc", "pre", 2, None),
)

# Words that end a cue's scope inside a sentence.
TERMINATORS = (
    r"but|however|although|though|except(?: for)?|aside from|apart from|other than"
    r"|whereas|nevertheless|nonetheless|yet|there (?:is|are|has been|have been)"
)

# Between two mentions, these make both uncertain ("atelectasis or pneumonia").
ALTERNATIVES = r"or|versus|vs"
